"""Extraction metrics shared by training-time evaluation, rayjobs/evaluate.py, the batch job and the benchmarks.

Field level: each object is flattened to (path, normalised value) pairs (schema.flatten); micro precision /
recall / F1 count pairs over all records. An invalid or missing prediction scores as an empty object (every gold
pair is a miss). Exact match: the flattened prediction equals the flattened gold.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

from jsonextract.errors import UserError
from jsonextract.data.schema import flatten


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, tp: int, fp: int, fn: int) -> None:
        self.tp += tp
        self.fp += fp
        self.fn += fn

    def prf(self) -> dict[str, float]:
        p = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        r = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        return {"precision": p, "recall": r, "f1": f, "tp": self.tp, "fp": self.fp, "fn": self.fn}


@dataclass
class Scorer:
    """Accumulate (prediction, gold) pairs; `result()` gives the metrics dict."""
    n: int = 0
    json_valid: int = 0
    schema_valid: int = 0
    exact: int = 0
    total: Counts = field(default_factory=Counts)
    per_field: dict[str, Counts] = field(default_factory=lambda: defaultdict(Counts))
    per_group: dict[str, Counts] = field(default_factory=lambda: defaultdict(Counts))

    def add(self, pred: Any, gold: Any, json_ok: bool = True, schema_ok: bool = True) -> None:
        """`pred` is the parsed output (None if it did not parse); json_ok/schema_ok say how it fared."""
        self.n += 1
        self.json_valid += int(json_ok and pred is not None)
        self.schema_valid += int(schema_ok and json_ok and pred is not None)
        p_items = flatten(pred) if (pred is not None and schema_ok) else set()
        g_items = flatten(gold)
        self.exact += int(pred is not None and schema_ok and p_items == g_items)
        paths = {p for p, _ in p_items | g_items}
        for path in paths:
            gp = {x for x in g_items if x[0] == path}
            pp = {x for x in p_items if x[0] == path}
            tp, fp, fn = len(gp & pp), len(pp - gp), len(gp - pp)
            self.per_field[path].add(tp, fp, fn)
            self.per_group[path.split(".")[0]].add(tp, fp, fn)
            self.total.add(tp, fp, fn)

    def result(self) -> dict[str, Any]:
        n = max(self.n, 1)
        out: dict[str, Any] = {
            "n": self.n,
            "json_valid_rate": self.json_valid / n,
            "schema_valid_rate": self.schema_valid / n,
            "exact_match": self.exact / n,
            **{k: v for k, v in self.total.prf().items() if k in ("precision", "recall", "f1")},
            "groups": {g: c.prf() for g, c in sorted(self.per_group.items())},
            "per_field": {p: c.prf() for p, c in sorted(self.per_field.items())},
        }
        return out


def judge(pred: Any, schema: dict | None = None) -> tuple[Any, bool, bool]:
    """(parsed object or None, json_ok, schema_ok) for any kind of prediction: a decoder Result, a result row of
    the batch job or of a predictions file (`output` as a JSON string or object, optional `valid`), a plain
    object, or None (missing)."""
    import json

    from jsonextract.data.schema import validation_error

    if pred is None:
        return None, False, False
    if hasattr(pred, "valid") and hasattr(pred, "reason"):  # decoding.Result
        return pred.output, pred.reason not in ("invalid_json", "truncated"), pred.valid
    is_row = isinstance(pred, dict) and ("id" in pred or "valid" in pred) and ("output" in pred or "prediction" in pred)
    row = pred if is_row else {"output": pred}
    out = row.get("output", row.get("prediction"))
    if isinstance(out, str):
        try:
            out = json.loads(out)
        except json.JSONDecodeError:
            return None, False, False
    if out is None:
        return None, False, False
    ok = bool(row.get("valid", True))
    if schema is not None:
        ok = ok and validation_error(out, schema) is None
    return out, True, ok


def score_results(pairs: Iterable[tuple[Any, Any]], schema: dict | None = None) -> dict[str, Any]:
    """The one way every job scores: (prediction, gold target) pairs, a prediction of any kind `judge` takes."""
    s = Scorer()
    for pred, gold in pairs:
        obj, json_ok, schema_ok = judge(pred, schema)
        s.add(obj, gold, json_ok, schema_ok)
    return s.result()


def format_table(metrics: dict[str, Any], max_fields: int = 60) -> str:
    """Human-readable report: headline metrics, per-group and per-field tables."""
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

    lines += table("group", metrics["groups"]) + [""] + table("field", metrics["per_field"])
    if metrics.get("grounding"):
        from jsonextract.evaluation.calibration import format_grounding
        lines += ["", format_grounding(metrics["grounding"])]
    return "\n".join(lines)


def score_files(predictions: str, gold: str, schema: dict | None = None,
                only_predicted: bool = False) -> dict[str, Any]:
    """Score a predictions file/folder against gold JSONL by id; a gold id with no prediction counts as invalid
    (or is left out with only_predicted=True, for runs over a slice)."""
    from jsonextract.data.records import read_jsonl
    from jsonextract.data.io import read_results

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
    from jsonextract.evaluation.calibration import grounding_metrics
    grounding = grounding_metrics((preds[rec.id], rec.target) for rec in golds if rec.id in preds)
    if grounding is not None:
        result["grounding"] = grounding
    return result
