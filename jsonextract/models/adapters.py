"""Many LoRA adapters over one base model: a registry of named adapters, and a model that keeps the base once
and attaches adapters to it by name (PEFT), one active per generate call.

A registry is a folder (or object-store URI) with one sub-folder per adapter, as the training job writes them
(`run.output_dir`); the sub-folder's name is the adapter's name. Requests name an adapter; they never give a
path. Each adapter's manifest brings its own schema and prompt settings.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonextract.config.core import ModelConfig, PromptConfig, build
from jsonextract.data.io import filesystem, local_folder
from jsonextract.data.prompt import PromptBuilder
from jsonextract.lazy import lazy
from jsonextract.models.attention import set_inference_attention
from jsonextract.models.inference import to_inference_dtype
from jsonextract.models.loading import ModelLoadError, load_inference_base, load_tokenizer
from jsonextract.models.manifest import MANIFEST, read_manifest, trained_base

pafs = lazy("pyarrow.fs")
peft = lazy("peft")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class UnknownAdapter(ModelLoadError):
    pass


class AdapterRegistry:
    """Adapter names -> local adapter folders. `root`: folder or URI holding one sub-folder per adapter;
    `single`: one adapter folder (named by its folder name), for a deployment of one adapter."""

    def __init__(self, root: str = "", single: str = ""):
        self.root, self.single = root, single
        self._local: dict[str, Path] = {}
        self.refresh()

    def refresh(self) -> None:
        """List the registry again (adapters added since start become available)."""
        found: dict[str, str] = {}
        if self.root:
            fs, base = filesystem(self.root)
            if fs.get_file_info(base).type != pafs.FileType.Directory:
                raise ModelLoadError(f"adapter registry not found: {self.root}")
            for info in fs.get_file_info(pafs.FileSelector(base)):
                name = Path(info.path).name
                if info.type == pafs.FileType.Directory and NAME.match(name) and \
                        fs.get_file_info(f"{info.path}/{MANIFEST}").type == pafs.FileType.File:
                    found[name] = info.path
        if self.single:
            if not Path(self.single, MANIFEST).is_file():
                raise ModelLoadError(f"{self.single} is not an adapter directory: {MANIFEST} is missing")
            found[Path(self.single).resolve().name] = str(Path(self.single).resolve())
        self._remote = found

    def names(self) -> list[str]:
        return sorted(self._remote)

    def path(self, name: str) -> Path:
        """The adapter's local folder (copied from object storage on first use). UnknownAdapter if the name is not
        in the registry: a name is looked up, never used as a path."""
        if name not in self._remote:
            self.refresh()
        if name not in self._remote:
            raise UnknownAdapter(f"unknown adapter {name[:80]!r}; this deployment has: {', '.join(self.names()) or 'none'}")
        if name not in self._local:
            src = self._remote[name]
            if "://" not in self.root or src == self.single:
                self._local[name] = Path(src)
            else:  # a local copy, shared by the processes on this machine (io.local_folder)
                self._local[name] = local_folder(self.root.rstrip("/") + "/" + name)
        return self._local[name]

    def manifest(self, name: str) -> dict:
        return read_manifest(self.path(name))


@dataclass(frozen=True)
class Adapter:
    name: str  # "" = the base model alone
    prompt: PromptBuilder
    manifest: dict | None


class MultiAdapterModel:
    """The base once in memory; adapters attached by name, detached on request, one active at a time."""

    def __init__(self, model_cfg: ModelConfig, registry: AdapterRegistry, device: str = "cpu"):
        self.registry = registry
        names = registry.names()
        self.base_cfg = trained_base(registry.manifest(names[0]), model_cfg) if names else model_cfg
        for name in names[1:]:  # fail at start, naming the adapter, rather than on its first request
            self._check_base(name, registry.manifest(name))
        # Adapters attach unmerged over the cast base; PEFT keeps their own weights in fp32 (autocast_adapter_dtype).
        self.base = to_inference_dtype(load_inference_base(self.base_cfg, device), self.base_cfg, device)
        set_inference_attention(self.base, self.base_cfg.inference_attention)
        self.tokenizer = load_tokenizer(str(registry.path(names[0])) if names else self.base_cfg.name)
        self.peft: Any = None

    def _check_base(self, name: str, manifest: dict) -> None:
        want = trained_base(manifest, self.base_cfg)
        if (want.name, want.quantization) != (self.base_cfg.name, self.base_cfg.quantization):
            # base names only, not their folders: the message may reach an HTTP client
            raise ModelLoadError(f"adapter {name!r} was trained over {Path(want.name).name} ({want.quantization}); "
                                 f"this deployment serves {Path(self.base_cfg.name).name} "
                                 f"({self.base_cfg.quantization}): one base per deployment")

    @property
    def model(self):
        return self.peft if self.peft is not None else self.base

    def loaded(self) -> list[str]:
        return list(self.peft.peft_config) if self.peft is not None else []

    def load(self, name: str) -> Adapter:
        manifest = self.registry.manifest(name)
        self._check_base(name, manifest)
        if name not in self.loaded():
            path = str(self.registry.path(name))
            if self.peft is None:
                self.peft = peft.PeftModel.from_pretrained(self.base, path, adapter_name=name)
            else:
                self.peft.load_adapter(path, adapter_name=name)
            self.peft.eval()
        prompt = build(PromptConfig, manifest["prompt"], source=f"adapter {name}/{MANIFEST}")
        return Adapter(name, PromptBuilder(prompt, manifest.get("schema")), manifest)

    def unload(self, name: str) -> None:
        """Free an adapter's weights; PEFT keeps at least one adapter attached, so the last one stays."""
        if name in self.loaded() and len(self.loaded()) > 1:
            if self.peft.active_adapter == name:
                self.peft.set_adapter(next(n for n in self.loaded() if n != name))
            self.peft.delete_adapter(name)

    @contextlib.contextmanager
    def active(self, name: str):
        """Run the model with adapter `name` ("" = the base alone)."""
        if not name:
            with self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext():
                yield self.model
            return
        if name not in self.loaded():
            self.load(name)
        self.peft.set_adapter(name)
        yield self.model
