"""Configuration of the evaluation job (`jsonextract evaluate`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvaluateConfig:
    predictions: str = ""  # predictions: JSONL/Parquet file or folder with `id` and `output` columns
    gold: str = ""  # gold JSONL with `id` and `target`
    schema: str = ""  # JSON Schema to re-validate outputs with (default: schema.json next to the gold file, if any)
    out: str = ""  # where to write the metrics JSON (default: next to the predictions)
    table_fields: int = 60  # fields in the printed per-field table; 0 = the headline metrics on one line (all are in the metrics JSON)
    only_predicted: bool = False  # score only gold ids that have a prediction (default: a missing one is a miss)
