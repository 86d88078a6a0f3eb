"""Run the Ray Serve application a config file describes (Ray's `serve run`, in the foreground; Ctrl-C stops it).

    jsonextract serve configs/serve/cpu.yaml [key=value ...]
    serve deploy configs/serve/cpu.yaml        (onto a running cluster: Ray's own command)

`key=value` overrides go to the first application's `args:` (the settings below), e.g. `adapter=DIR` or
`adapters=s3://bucket/adapters default_adapter=snips`; they are checked before Ray starts.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from jsonextract.config.core import ConfigError, build, help_text, merge, parse_overrides
from jsonextract.config.serve import ServeConfig


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(help_text(ServeConfig, (__doc__ or "").strip()))
        return 0 if argv else 2
    path, overrides = Path(argv[0]), argv[1:]
    if not path.is_file():
        raise ConfigError(f"serve config not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    apps = spec.get("applications") if isinstance(spec, dict) else None
    if not apps or not isinstance(apps[0], dict):
        raise ConfigError(f"{path}: no `applications:` list (a Ray Serve config file)")
    apps[0]["args"] = merge(apps[0].get("args") or {}, parse_overrides(overrides))
    for app in apps:
        build(ServeConfig, app.get("args") or {}, source=f"{path}: application {app.get('name', '?')!r} args")
    # Ray's own command runs the file: the same code path as `serve run` / `serve deploy` on a cluster.
    serve_cli = Path(sys.executable).with_name("serve")
    exe = str(serve_cli) if serve_cli.exists() else shutil.which("serve")
    if exe is None:
        raise ConfigError("Ray Serve's `serve` command was not found next to this Python or on PATH")
    run_file = path
    if overrides:
        fd, name = tempfile.mkstemp(prefix="jsonextract-serve-", suffix=".yaml", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(spec, f, sort_keys=False)
        run_file = Path(name)
    sys.stdout.flush()
    os.execv(exe, [exe, "run", str(run_file)])
    return 0  # not reached: execv replaces this process
