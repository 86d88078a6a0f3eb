"""Scoring a predictions file or folder against gold JSONL, and the human-readable metrics table: field-level
metrics (metrics.py) together with grounding and calibration (calibration.py)."""
from __future__ import annotations

from typing import Any

from jsonextract.data.io import read_results
from jsonextract.data.records import read_jsonl
from jsonextract.errors import UserError
from jsonextract.evaluation.calibration import format_grounding, grounding_metrics
from jsonextract.evaluation.metrics import score_results


def format_table(metrics: dict[str, Any], max_fields: int = 60) -> str:
    """Human-readable report: headline metrics, then (max_fields > 0) per-group and per-field tables and grounding."""
    lines = [
        f"records            {metrics['n']}",
        f"JSON-valid rate    {metrics['json_valid_rate']:.4f}",
        f"schema-valid rate  {metrics['schema_valid_rate']:.4f}",
        f"exact match        {metrics['exact_match']:.4f}",
        f"field precision    {metrics['precision']:.4f}",
        f"field recall       {metrics['recall']:.4f}",
        f"field F1           {metrics['f1']:.4f}",
        "",
    ]

    def table(title: str, rows: dict[str, dict]) -> list[str]:
        w = max([len(title)] + [len(k) for k in rows]) + 2
        out = [f"{title:<{w}}{'P':>8}{'R':>8}{'F1':>8}{'TP':>7}{'FP':>7}{'FN':>7}"]
        for k, m in list(rows.items())[:max_fields]:
            out.append(f"{k:<{w}}{m['precision']:>8.3f}{m['recall']:>8.3f}{m['f1']:>8.3f}"
                       f"{m['tp']:>7}{m['fp']:>7}{m['fn']:>7}")
        if len(rows) > max_fields:
            out.append(f"... {len(rows) - max_fields} more fields in the metrics JSON")
        return out

    if max_fields <= 0:  # one line
        return (f"records {metrics['n']} | JSON-valid {metrics['json_valid_rate']:.1%} | schema-valid "
                f"{metrics['schema_valid_rate']:.1%} | exact match {metrics['exact_match']:.1%} | field P "
                f"{metrics['precision']:.4f} R {metrics['recall']:.4f} F1 {metrics['f1']:.4f}")
    lines += table("group", metrics["groups"]) + [""] + table("field", metrics["per_field"])
    if metrics.get("grounding"):
        lines += ["", format_grounding(metrics["grounding"])]
    return "\n".join(lines)


def score_files(predictions: str, gold: str, schema: dict | None = None,
                only_predicted: bool = False) -> dict[str, Any]:
    """Score a predictions file/folder against gold JSONL by id; a gold id with no prediction counts as invalid
    (or is left out with only_predicted=True, for runs over a slice)."""
    preds = {str(r["id"]): r for r in read_results(predictions) if "id" in r}
    golds = []
    for rec in read_jsonl(gold, need_target=True):
        if not rec.ok:
            raise UserError(f"gold file: {rec.error}")
        golds.append(rec)
    missing = sum(1 for rec in golds if rec.id not in preds)
    pairs = [(preds.get(rec.id), rec.target) for rec in golds if rec.id in preds or not only_predicted]
    result = score_results(pairs, schema)
    result["missing_predictions"] = missing
    grounding = grounding_metrics((preds[rec.id], rec.target) for rec in golds if rec.id in preds)
    if grounding is not None:
        result["grounding"] = grounding
    return result
