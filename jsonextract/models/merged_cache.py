"""A disk cache of inference weights with the adapter merged in (`model.merged_cache`): the first load of an
adapter builds them as before (NF4 base quantised on load, dequantised, LoRA merged by peft) and saves them as
a plain Hugging Face model folder; every later load, in any process on the machine, reads that folder instead.

Why: most of a replica's start-up went to quantising the base on load and importing peft (which imports
bitsandbytes, which imports torch's compiler); from the merged folder a replica starts without either. The entry is keyed by everything the merged values
depend on, so a retrained adapter, another base or another library version never reads a stale entry.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

from jsonextract.config.core import ModelConfig
from jsonextract.lazy import lazy
from jsonextract.logs import detail
from jsonextract.models.loading import load_base

huggingface_hub = lazy("huggingface_hub")

KEEP = 3  # entries kept per cache folder (most recently used); each is one full copy of the model's weights
INFO = "jsonextract-merged.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json")
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes")  # their versions decide the dequantised values


def _version(lib: str) -> str:
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return "none"


def _base_dir(name: str) -> Path | None:
    """The folder holding the base's files: a local path, or the downloaded snapshot of a hub id (None if the
    hub id was never downloaded on this machine: nothing to key on yet)."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    try:
        found = huggingface_hub.try_to_load_from_cache(name, "config.json")
    except Exception:  # an id the hub library rejects: not cacheable, loading reports the real error
        return None
    return Path(found).parent if isinstance(found, str) else None


def cache_key(cfg: ModelConfig, adapter: str | Path) -> str | None:
    """Hex digest of what the merged weights depend on: the base's files (name, size, mtime: hashing a
    multi-GB base on every start would cost more than it saves), the adapter's weights and config (hashed),
    the settings that shape the values, and the library versions. None when the base cannot be identified."""
    base = _base_dir(cfg.name)
    if base is None:
        return None
    h = hashlib.sha256()
    h.update(json.dumps({"base": cfg.name, "quantization": cfg.quantization, "dtype": cfg.dtype,
                         "inference_weights": cfg.inference_weights, "trust_remote_code": cfg.trust_remote_code,
                         "versions": {lib: _version(lib) for lib in LIBRARIES}}, sort_keys=True).encode())
    for f in sorted(base.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    for name in ADAPTER_FILES:
        f = Path(adapter, name)
        if f.is_file():
            h.update(name.encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:24]


class MergedCache:
    """One entry of the cache: `load()` the merged model if it is there, `save()` it after building it."""

    def __init__(self, folder: str, key: str, adapter: str | Path, cfg: ModelConfig):
        self.root = Path(folder).expanduser()
        self.entry = self.root / key
        self.adapter, self.cfg = str(adapter), cfg

    @classmethod
    def for_model(cls, cfg: ModelConfig, adapter: str | Path) -> "MergedCache | None":
        if not cfg.merged_cache:
            return None
        key = cache_key(cfg, adapter)
        return cls(cfg.merged_cache, key, adapter, cfg) if key else None

    def load(self, device: str):
        """The cached merged model in eval mode, or None (no entry yet, or a damaged one: removed, to be rebuilt)."""
        if not (self.entry / INFO).is_file():
            return None
        try:  # the entry is a plain model folder: loaded as a base with nothing to quantise
            model = load_base(dataclasses.replace(self.cfg, name=str(self.entry), quantization="none"), device)
        except Exception as e:  # a damaged entry costs one rebuild, never the load
            print(f"[model] merged weights in {self.entry} unreadable ({type(e).__name__}: {e}); rebuilding",
                  flush=True)
            shutil.rmtree(self.entry, ignore_errors=True)
            return None
        os.utime(self.entry)  # most recently used: kept when older entries are pruned
        detail(f"[model] merged weights read from {self.entry} (model.merged_cache)")
        return model.eval()

    def save(self, model) -> None:
        """Write the entry (to a temporary folder, then one rename: a reader never sees half an entry; replicas
        that built it at the same time keep the first). A full disk or a read-only cache only costs speed."""
        if (self.entry / INFO).is_file():
            return
        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=self.root))
            model.save_pretrained(tmp)
            (tmp / INFO).write_text(json.dumps({"adapter": str(Path(self.adapter).resolve()),
                                                "base": self.cfg.name, "dtype": self.cfg.dtype,
                                                "quantization": self.cfg.quantization}, indent=1))
            os.rename(tmp, self.entry)
            tmp = None
            detail(f"[model] merged weights saved to {self.entry} (model.merged_cache): later loads read them")
        except OSError as e:
            if not (self.entry / INFO).is_file():
                print(f"[model] could not save merged weights to {self.root}: {e}", flush=True)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        self.prune()

    def prune(self) -> None:
        """Keep the KEEP most recently used entries; leftovers of builds killed midway go after an hour."""
        try:  # other processes may add or remove entries meanwhile
            entries = sorted((p for p in self.root.iterdir() if (p / INFO).is_file()),
                             key=lambda p: p.stat().st_mtime, reverse=True)
            stale = [p for p in self.root.glob(".building-*") if time.time() - p.stat().st_mtime > 3600]
        except OSError:
            return
        for p in entries[KEEP:] + stale:
            shutil.rmtree(p, ignore_errors=True)
