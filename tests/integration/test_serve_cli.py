"""`jsonextract serve configs/serve/<name>.yaml` (Ray's `serve run` on it) from the command line comes up, answers over HTTP, and is stopped.
(Its own module: `serve run` starts its own Ray, so no in-process Ray may be running.)"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

from conftest import JSONEXTRACT, ROOT, SNIPS

PORT = 8013


def test_serve_run_config_file(tiny_model, tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "serve" / "cpu.yaml").read_text())
    cfg["http_options"]["port"] = PORT
    app = cfg["applications"][0]
    app["args"] = {"model": {"name": str(tiny_model)}, "schema": str(SNIPS / "schema.json"),
                   "decoding": {"max_new_tokens": 24}}  # the shipped config names the main job's adapter
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.Popen([JSONEXTRACT, "serve", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        up = False
        while time.time() < deadline and proc.poll() is None:
            try:
                up = requests.get(f"http://127.0.0.1:{PORT}/healthz", timeout=5).status_code == 200
            except requests.RequestException:  # not listening yet, or the ingress still starting (a timeout)
                pass
            if up:
                break
            time.sleep(2)
        assert up, proc.stdout.read().decode()[-3000:] if proc.poll() is not None else "not up in 240 s"
        r = requests.post(f"http://127.0.0.1:{PORT}/extract", json={"text": "play jazz"}, timeout=120)
        assert r.status_code == 200 and "valid" in r.json()
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: serve run shuts Serve and its Ray down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
