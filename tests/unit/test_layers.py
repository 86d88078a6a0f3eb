"""The package's layering holds (pyproject's import-linter contracts: each layer imports only layers below it, no
cycles, the library never imports the Serve app), and each sub-package imports on its own in a fresh process."""
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGES = ["config", "data", "models", "decoding", "evaluation", "training", "batch"]


def test_import_contracts_hold():
    r = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "0 broken" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_alone_without_loading_model_libraries_it_does_not_use(package):
    """Importing a package loads nothing above it; the layers below decoding never load torch at import."""
    code = (f"import sys, jsonextract.{package}.__init__, importlib; importlib.import_module('jsonextract.{package}'); "
            "import pkgutil, jsonextract." + package + " as p; "
            "[importlib.import_module(m.name) for m in pkgutil.iter_modules(p.__path__, p.__name__ + '.')]; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('jsonextract.'))), 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    *mods, torch_loaded = r.stdout.split()
    above = {"config": PACKAGES[1:], "data": PACKAGES[2:], "models": PACKAGES[3:], "decoding": ["training", "batch"],
             "evaluation": ["decoding", "training", "batch", "models"], "training": ["batch"], "batch": ["training"]}
    loaded = {m.split(".")[1] for m in mods}
    assert not loaded & set(above[package]) and "cli" not in loaded, loaded
    if package in ("config", "data", "evaluation"):
        assert torch_loaded == "False"
