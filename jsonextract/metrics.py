"""Extraction metrics shared by training-time evaluation, rayjobs/evaluate.py, the batch job and the benchmarks.

Field level: each object is flattened to (path, normalised value) pairs (schema.flatten); micro precision /
recall / F1 count pairs over all records. An invalid or missing prediction scores as an empty object (every gold
pair is a miss). Exact match: the flattened prediction equals the flattened gold.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

from .errors import UserError
from .schema import flatten


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


def score(pairs: Iterable[tuple[Any, Any]]) -> dict[str, Any]:
    """Score (prediction, gold) pairs where a prediction of None means invalid/missing."""
    s = Scorer()
    for pred, gold in pairs:
        s.add(pred, gold, json_ok=pred is not None, schema_ok=pred is not None)
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
    return "\n".join(lines)


def read_rows(path: str) -> list[dict]:
    """Rows of a JSONL file, a Parquet file, or a folder of them (the batch job's output)."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise UserError(f"not found: {p}")
    # In a folder, files named _* or .* are not results (the batch job writes _summary.json and _metrics.json).
    files = sorted(x for x in p.rglob("*") if x.suffix in (".jsonl", ".json", ".parquet")
                   and not x.name.startswith(("_", "."))) if p.is_dir() else [p]
    rows: list[dict] = []
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq
            rows += pq.read_table(f).to_pylist()
        else:
            for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UserError(f"{f}:{n}: not valid JSON ({e.msg})") from None
    return rows


def prediction_of(row: dict, schema: dict | None) -> tuple[Any, bool, bool]:
    """(parsed object or None, json_ok, schema_ok) for one prediction row of the batch job or a plain file."""
    import json

    from .schema import validation_error

    out = row.get("output", row.get("prediction"))
    if isinstance(out, str):
        try:
            out = json.loads(out)
        except json.JSONDecodeError:
            return None, False, False
    if out is None:
        return None, False, False
    if schema is not None:
        return out, True, validation_error(out, schema) is None
    return out, True, bool(row.get("valid", True))


def score_files(predictions: str, gold: str, schema: dict | None = None,
                only_predicted: bool = False) -> dict[str, Any]:
    """Score a predictions file/folder against gold JSONL by id; a gold id with no prediction counts as invalid
    (or is left out with only_predicted=True, for runs over a slice)."""
    from .data import read_jsonl

    preds = {str(r["id"]): r for r in read_rows(predictions) if "id" in r}
    s = Scorer()
    missing = 0
    for rec in read_jsonl(gold, need_target=True):
        if not rec.ok:
            raise UserError(f"gold file: {rec.error}")
        row = preds.get(rec.id)
        if row is None:
            missing += 1
            if only_predicted:
                continue
            s.add(None, rec.target, False, False)
            continue
        obj, json_ok, schema_ok = prediction_of(row, schema)
        s.add(obj, rec.target, json_ok, schema_ok)
    result = s.result()
    result["missing_predictions"] = missing
    return result
