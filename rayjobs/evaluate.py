"""Score predictions against gold records.

    python rayjobs/evaluate.py predictions=out/preds.parquet gold=data/snips/test.jsonl [out=metrics.json]

Reports JSON-valid rate, schema-valid rate, field-level micro precision/recall/F1 over flattened paths (strings
strip+casefold; list elements as a set; null/missing on both sides is no hit), exact match, and a per-field table.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jsonextract import cli  # noqa: E402
from jsonextract.data.schema import load_schema  # noqa: E402
from jsonextract.errors import UserError  # noqa: E402
from jsonextract.evaluation.score import format_table, score_files  # noqa: E402


@dataclass(frozen=True)
class EvaluateConfig:
    predictions: str = ""  # predictions: JSONL/Parquet file or folder with `id` and `output` columns
    gold: str = ""  # gold JSONL with `id` and `target`
    schema: str = ""  # JSON Schema to re-validate outputs with (default: schema.json next to the gold file, if any)
    out: str = ""  # where to write the metrics JSON (default: next to the predictions)
    only_predicted: bool = False  # score only gold ids that have a prediction (default: a missing one is a miss)


def main() -> int:
    cfg = cli.parse(EvaluateConfig)
    if not cfg.predictions or not cfg.gold:
        raise UserError("evaluate needs predictions=PATH and gold=PATH")
    schema_path = cfg.schema or str(Path(cfg.gold).with_name("schema.json"))
    schema = load_schema(schema_path) if Path(schema_path).is_file() else None
    metrics = score_files(cfg.predictions, cfg.gold, schema, cfg.only_predicted)
    pred = Path(cfg.predictions)
    out = Path(cfg.out) if cfg.out else (pred if pred.is_dir() else pred.parent) / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=1))
    print(format_table(metrics))
    print(f"\nmetrics written to {out}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
