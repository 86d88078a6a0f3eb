"""How far grounding and confidence can be trusted, measured against gold targets: the share of free-text values
found in the text, the precision of values found vs not found, what drop_ungrounded would do to precision and
recall, and calibration (accuracy per confidence bucket, expected calibration error).

A predicted value is correct when its (path, normalised value) pair is in the gold object's flattened pairs
(schema.flatten: list indices dropped, strings stripped and case-folded), as in the field-level metrics.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

from jsonextract.data.records import json_value
from jsonextract.data.schema import flatten
from jsonextract.evaluation.metrics import Counts

BUCKETS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0)
INDEX = re.compile(r"\[\d+\]")


def _leaf_values(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out |= _leaf_values(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out |= _leaf_values(v, f"{prefix}[{i}]")
    elif obj is not None:
        out[prefix] = obj
    return out


def _pair(path: str, value: Any) -> tuple[str, str]:
    flat = flatten(value, INDEX.sub("", path))
    return next(iter(flat)) if flat else ("", "")


def grounding_metrics(pairs: Iterable[tuple[dict, Any]]) -> dict[str, Any] | None:
    """From (result row with `output`, `grounding`, `confidence`, gold target) pairs; None when no row has
    grounding (a run with grounding=off)."""
    grounded, ungrounded = Counts(), Counts()
    annotate, dropped = Counts(), Counts()
    scored: list[tuple[float, bool]] = []  # (confidence, correct) per value
    scored_t1: list[tuple[float, bool]] = []  # the same at temperature 1, where the adapter has a temperature
    seen = False
    n_snapped = n_dropped = 0  # by the run's own policy (decoding.grounding=snap or drop_ungrounded)
    for row, gold in pairs:
        n_snapped += len(json_value(row.get("snapped")) or {})
        n_dropped += len(json_value(row.get("dropped")) or [])
        g_items = flatten(gold) if gold is not None else set()
        out = json_value(row.get("output")) if row.get("valid") else None
        grounding = json_value(row.get("grounding")) or {}
        conf = json_value(row.get("confidence")) or {}
        conf_t1 = json_value(row.get("confidence_uncalibrated")) or {}
        seen = seen or bool(grounding)
        kept_items, all_items = set(), set()
        for path, value in _leaf_values(out).items():
            item = _pair(path, value)
            ok = item in g_items
            all_items.add(item)
            g = grounding.get(path, {"match": "label"})
            if g is None:
                ungrounded.add(int(ok), int(not ok), 0)
            else:
                kept_items.add(item)
                if g.get("match") != "label":
                    grounded.add(int(ok), int(not ok), 0)
            if path in conf:
                scored.append((conf[path], ok))
            if path in conf_t1:
                scored_t1.append((conf_t1[path], ok))
        for counts, items in ((annotate, all_items), (dropped, kept_items)):
            counts.add(len(items & g_items), len(items - g_items), len(g_items - items))
    if not seen:
        return None
    n_free = grounded.tp + grounded.fp + ungrounded.tp + ungrounded.fp
    table, ece = calibration_table(scored)
    before = {}
    if scored_t1:  # confidences at the adapter's fitted temperature, and before it
        before["calibration_uncalibrated"], before["expected_calibration_error_uncalibrated"] = \
            calibration_table(scored_t1)
    return before | {
        "free_text_values": n_free,
        "snapped": n_snapped,
        "dropped": n_dropped,
        "grounded_share": (grounded.tp + grounded.fp) / n_free if n_free else None,
        "precision_grounded": grounded.prf()["precision"] if grounded.tp + grounded.fp else None,
        "precision_ungrounded": ungrounded.prf()["precision"] if ungrounded.tp + ungrounded.fp else None,
        "annotate": {k: annotate.prf()[k] for k in ("precision", "recall", "f1")},
        "drop_ungrounded": {k: dropped.prf()[k] for k in ("precision", "recall", "f1")},
        "calibration": table,
        "expected_calibration_error": ece,
    }


def calibration_table(scored: list[tuple[float, bool]]) -> tuple[list[dict], float | None]:
    """(accuracy and mean confidence per confidence bucket, expected calibration error) of (confidence, correct)
    pairs."""
    buckets = [[0, 0.0, 0] for _ in BUCKETS[:-1]]  # count, confidence sum, correct
    for c, ok in scored:
        b = min(sum(c >= edge for edge in BUCKETS[1:-1]), len(buckets) - 1)
        buckets[b][0] += 1
        buckets[b][1] += c
        buckets[b][2] += int(ok)
    total = sum(b[0] for b in buckets)
    table = [{"bucket": f"[{lo:.2f}, {hi:.2f}{']' if hi == 1.0 else ')'}", "n": b[0],
              "mean_confidence": b[1] / b[0] if b[0] else None, "accuracy": b[2] / b[0] if b[0] else None}
             for (lo, hi), b in zip(zip(BUCKETS, BUCKETS[1:]), buckets)]
    ece = sum(b[0] / total * abs(b[2] / b[0] - b[1] / b[0]) for b in buckets if b[0]) if total else None
    return table, ece


def format_grounding(m: dict[str, Any]) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}"
    lines = [f"free-text values       {m['free_text_values']}",
             f"grounded share         {f(m['grounded_share'])}",
             f"precision grounded     {f(m['precision_grounded'])}",
             f"precision ungrounded   {f(m['precision_ungrounded'])}",
             f"snapped, dropped       {m.get('snapped', 0)}, {m.get('dropped', 0)} (by the run's policy)",
             "outputs                   P      R      F1"]
    for policy, label in (("annotate", "as extracted"), ("drop_ungrounded", "values not found removed")):
        p = m[policy]
        lines.append(f"{label:<24}{p['precision']:>6.3f} {p['recall']:>6.3f} {p['f1']:>6.3f}")
    lines.append("confidence bucket   n   mean conf  accuracy")
    for b in m["calibration"]:
        lines.append(f"{b['bucket']:<16}{b['n']:>6}   {f(b['mean_confidence']):>8}  {f(b['accuracy']):>8}")
    lines.append(f"expected calibration error {f(m['expected_calibration_error'])}")
    if m.get("calibration_uncalibrated"):
        lines.append(f"  (before the adapter's temperature: {f(m['expected_calibration_error_uncalibrated'])})")
    return "\n".join(lines)
