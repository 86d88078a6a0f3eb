"""Score predictions against gold records.

    jsonextract evaluate predictions=out/preds.parquet gold=data/snips/test.jsonl [out=metrics.json]

Reports JSON-valid rate, schema-valid rate, field-level micro precision/recall/F1 over flattened paths (strings
strip+casefold; list elements as a set; null/missing on both sides is no hit), exact match, and a per-field table.
"""
from __future__ import annotations

import json
from pathlib import Path

from jsonextract.config.core import parse_args
from jsonextract.config.evaluate import EvaluateConfig
from jsonextract.data.schema import load_schema
from jsonextract.errors import UserError
from jsonextract.evaluation.score import format_table, score_files


def main(argv: list[str]) -> int:
    cfg = parse_args(EvaluateConfig, argv, __doc__)
    if not cfg.predictions or not cfg.gold:
        raise UserError("evaluate needs predictions=PATH and gold=PATH")
    schema_path = cfg.schema or str(Path(cfg.gold).with_name("schema.json"))
    schema = load_schema(schema_path) if Path(schema_path).is_file() else None
    metrics = score_files(cfg.predictions, cfg.gold, schema, cfg.only_predicted)
    pred = Path(cfg.predictions)
    out = Path(cfg.out) if cfg.out else (pred if pred.is_dir() else pred.parent) / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=1))
    print(format_table(metrics, max_fields=cfg.table_fields))
    print(f"\nmetrics written to {out}")
    return 0

