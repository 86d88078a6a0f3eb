"""An adapter directory's manifest.json: what the adapter was trained over and with (base model, quantisation,
prompt settings and version, schema, config, metrics, calibrated temperature). Every reader of an adapter gets
these facts from here."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from jsonextract.config.core import ModelConfig, PromptConfig, to_dict
from jsonextract.data.prompt import PROMPT_VERSION
from jsonextract.data.schema import schema_hash
from jsonextract.models.loading import ModelLoadError

MANIFEST = "manifest.json"


def write_manifest(adapter_dir: str | Path, *, base_model: str, prompt: PromptConfig, schema: dict | None,
                   config: dict, metrics: dict | None = None, step: int | None = None) -> dict:
    if Path(base_model).expanduser().exists():  # record local bases absolutely: jobs may run from another cwd
        base_model = str(Path(base_model).expanduser().resolve())
    manifest = {
        "base_model": base_model,
        "prompt_version": PROMPT_VERSION,
        "prompt": to_dict(prompt),
        "schema": schema,
        "schema_hash": schema_hash(schema) if schema is not None else None,
        "config": config,
        "metrics": metrics or {},
        "step": step,
    }
    Path(adapter_dir, MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


def read_manifest(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / MANIFEST
    if not path.is_file():
        raise ModelLoadError(f"{adapter_dir} is not an adapter directory: {MANIFEST} is missing")
    manifest = json.loads(path.read_text())
    if manifest.get("prompt_version") != PROMPT_VERSION:
        raise ModelLoadError(
            f"adapter {adapter_dir} was trained with prompt version {manifest.get('prompt_version')!r}, but this code "
            f"builds prompt version {PROMPT_VERSION!r}: the model would see different text than it learned. "
            f"Retrain the adapter, or use the project version that wrote it.")
    return manifest


def trained_base(manifest: dict, fallback: ModelConfig) -> ModelConfig:
    """The base an adapter must run on: its manifest's base model and quantisation (LoRA weights trained over an
    NF4 base learned to compensate that base's quantisation error), the rest of the settings from `fallback`."""
    trained = manifest.get("config", {}).get("model", {})
    return dataclasses.replace(fallback, name=manifest["base_model"],
                               quantization=trained.get("quantization", fallback.quantization))


def temperature_of(manifest: dict | None) -> float:
    """The adapter's calibration temperature (1 where it has none)."""
    cal = (manifest or {}).get("calibration") or {}
    t = cal.get("temperature", 1.0) if isinstance(cal, dict) else 1.0
    return float(t) if isinstance(t, (int, float)) and math.isfinite(t) and t > 0 else 1.0
