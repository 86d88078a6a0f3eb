"""Configuration of the end-to-end pipeline (rayjobs/pipeline.py): which data, which job configs, where to write."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "snips"  # run name: adapter, checkpoints and report are written under it
    data: str = "../shared/data/snips"  # data set folder: train/dev/test.jsonl + schema.json
    tiny: str = "configs/tiny/snips.yaml"  # tiny model shape (the model is built from data/train.jsonl)
    train: str = "configs/train/snips_cpu.yaml"  # training job config
    extract: str = "configs/extract/tiny_cpu.yaml"  # batch extraction job config
    split: str = "test"  # split that is extracted and scored at the end
    limit: int = 0  # score only N records of the split, spread evenly over it (0 = all)
    baseline_limit: int = 100  # also score the untrained model on N records spread over the split (0 = skip)
    out: str = "artifacts/main"  # report, predictions and metrics go to <out>/<name>
    model_dir: str = ""  # where the tiny model is built (default: artifacts/tiny-<name>/model)
    adapter_dir: str = ""  # where the fine-tuned adapter goes (default: artifacts/adapters/<name>)
    start_at: int = 1  # first step to run (1 build, 2 train, 3 extract, 4 evaluate); earlier steps' outputs are reused
    runs_dir: str = "runs"  # training checkpoints (run.storage_path); the pipeline starts <runs_dir>/<name> fresh
    train_overrides: tuple[str, ...] = ()  # extra key=value overrides for the training job
    extract_overrides: tuple[str, ...] = ()  # extra key=value overrides for the extraction job
