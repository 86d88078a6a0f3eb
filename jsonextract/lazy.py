"""Heavy third-party modules (torch, transformers, ray, xgrammar, ...) named at the top of a module but imported
on first use: `torch = lazy("torch")`.

Why: the command line's `--help` and config checks, the Serve ingress, and drivers that only schedule work never
pay for importing torch, transformers or ray (seconds, and hundreds of MB in every process), while each module
still states every dependency at its top, in one way.
"""
from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """Stands for module `name`; the first attribute access imports it (and `also`, submodules used as attributes,
    e.g. `ray.train`) and from then on behaves as that module. Pickles as the same lazy reference, so Ray's
    by-value pickling of a function that names it stays small."""

    def __init__(self, name: str, *also: str):
        self._name, self._also, self._module = name, also, None

    def _load(self):
        if self._module is None:
            for sub in self._also:
                importlib.import_module(sub)
            self._module = importlib.import_module(self._name)
        return self._module

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_") and attr in ("_name", "_also", "_module"):
            raise AttributeError(attr)
        return getattr(self._load(), attr)

    def __reduce__(self):
        return (LazyModule, (self._name, *self._also))

    def __repr__(self) -> str:
        return f"<lazy module {self._name}{' (loaded)' if self._module is not None else ''}>"


def lazy(name: str, *also: str) -> Any:
    return LazyModule(name, *also)
