"""Extraction metrics shared by training-time evaluation, the evaluate job, the batch job and the benchmarks.

Field level: each object is flattened to (path, normalised value) pairs (schema.flatten); micro precision /
recall / F1 count pairs over all records. An invalid or missing prediction scores as an empty object (every gold
pair is a miss). Exact match: the flattened prediction equals the flattened gold.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

from jsonextract.data.records import json_value
from jsonextract.data.schema import flatten, validation_error


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
    if pred is None:
        return None, False, False
    if hasattr(pred, "valid") and hasattr(pred, "reason"):  # decoding.Result
        return pred.output, pred.reason not in ("invalid_json", "truncated"), pred.valid
    is_row = isinstance(pred, dict) and ("id" in pred or "valid" in pred) and ("output" in pred or "prediction" in pred)
    row = pred if is_row else {"output": pred}
    out = row.get("output", row.get("prediction"))
    try:
        out = json_value(out)
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
