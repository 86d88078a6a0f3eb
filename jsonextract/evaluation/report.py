"""The run report: metrics tables, loss and dev-F1 curves (PNG), and example predictions, as Markdown."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonextract.data.schema import flatten
from jsonextract.lazy import lazy

matplotlib = lazy("matplotlib")
plt = lazy("matplotlib.pyplot")


def plot_history(history: list[dict], out_dir: Path) -> list[str]:
    matplotlib.use("Agg")

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    dev = [(h["step"], h["dev_loss"]) for h in history if "dev_loss" in h]
    f1 = [(h["step"], h["dev_f1"]) for h in history if "dev_f1" in h]
    files = []

    def save(fig, ax, ylabel: str, name: str) -> None:
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        files.append(name)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if dev:
        ax.plot(*zip(*dev), "o-", label="dev loss")
    ax.set_yscale("log")
    save(fig, ax, "loss (answer tokens)", "loss.png")
    if f1:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*f1), "o-", label="dev field F1")
        for key, label in (("dev_intent_f1", "dev intent F1"), ("dev_slots_f1", "dev slots F1")):
            pts = [(h["step"], h[key]) for h in history if key in h]
            if pts:
                ax.plot(*zip(*pts), ".--", label=label)
        ax.set_ylim(0, 1)
        save(fig, ax, "F1", "dev_f1.png")
    return files


def _side_by_side(runs: dict[str, dict]) -> str:
    names = list(runs)
    keys = [("schema-valid rate", "schema_valid_rate", "{:.1%}"), ("exact match", "exact_match", "{:.1%}"),
            ("field F1", "f1", "{:.3f}")]
    rows = [(label, [fmt.format(runs[n][k]) for n in names]) for label, k, fmt in keys]
    for g in next(iter(runs.values())).get("groups", {}):
        rows.append((f"{g} F1", [f"{runs[n]['groups'][g]['f1']:.3f}" for n in names]))
    head = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    return "\n".join(head + [f"| {a} | " + " | ".join(v) + " |" for a, v in rows])


def _headline(m: dict) -> str:
    groups = m.get("groups", {})
    rows = [("records", f"{m['n']}"), ("JSON-valid rate", f"{m['json_valid_rate']:.1%}"),
            ("schema-valid rate", f"{m['schema_valid_rate']:.1%}"), ("exact match", f"{m['exact_match']:.1%}"),
            ("field precision", f"{m['precision']:.3f}"), ("field recall", f"{m['recall']:.3f}"),
            ("field F1", f"{m['f1']:.3f}")]
    for g, gm in groups.items():
        rows.append((f"{g} F1 (P / R)", f"{gm['f1']:.3f} ({gm['precision']:.3f} / {gm['recall']:.3f})"))
    return "\n".join(["| metric | value |", "|---|---:|"] + [f"| {a} | {b} |" for a, b in rows])


def _fields(m: dict) -> str:
    lines = ["| field | P | R | F1 | TP | FP | FN |", "|---|---:|---:|---:|---:|---:|---:|"]
    for f, x in m["per_field"].items():
        lines.append(f"| {f} | {x['precision']:.3f} | {x['recall']:.3f} | {x['f1']:.3f} | {x['tp']} | {x['fp']} | "
                     f"{x['fn']} |")
    return "\n".join(lines)


def _examples(pred_rows: list[dict], gold: dict[str, Any], texts: dict[str, str], k: int = 5) -> str:
    right, wrong = [], []
    for r in pred_rows:
        if r["id"] not in gold:
            continue
        out = json.loads(r["output"]) if r.get("output") else None
        ok = out is not None and flatten(out) == flatten(gold[r["id"]])
        (right if ok else wrong).append((r, out))
    lines = []
    for title, items in (("Right", right[:k]), ("Wrong", wrong[:k])):
        lines.append(f"**{title}** ({len(right) if title == 'Right' else len(wrong)} in all)\n")
        for r, out in items:
            got = json.dumps(out, ensure_ascii=False) if out is not None else f"error: {r.get('error')}"
            lines.append(f"- text: `{texts.get(r['id'], '')}`\n  - predicted: `{got}`\n"
                         f"  - gold: `{json.dumps(gold[r['id']], ensure_ascii=False)}`")
        lines.append("")
    return "\n".join(lines)


def grounding_section(m: dict, out_dir: Path) -> list[str]:
    """Grounding share, precision of grounded vs ungrounded values, what the run's policy changed, the outputs as
    extracted vs with the values not found removed, calibration."""
    matplotlib.use("Agg")

    def f(x):
        return "-" if x is None else f"{x:.3f}"
    parts = ["## Grounding and confidence\n",
             f"{m['free_text_values']} free-text values predicted; {f(m['grounded_share'])} of them found in the "
             f"text. Precision of values found: {f(m['precision_grounded'])}; not found: "
             f"{f(m['precision_ungrounded'])}.\n",
             *([f"The run's grounding policy replaced {m['snapped']} values the model did not copy from the "
                f"text by the nearest span of it and removed {m['dropped']} (counted above as they are after "
                "that).\n"] if m.get("snapped") or m.get("dropped") else []),
             "| outputs | precision | recall | F1 |", "|---|---:|---:|---:|"]
    for policy, label in (("annotate", "as extracted"), ("drop_ungrounded", "values not found removed")):
        p = m[policy]
        parts.append(f"| {label} | {p['precision']:.3f} | {p['recall']:.3f} | {p['f1']:.3f} |")
    parts += ["", "(values not found removed: what `decoding.grounding=drop_ungrounded` would give on top of these "
              "outputs.)\n"]
    before = m.get("calibration_uncalibrated")
    if before:  # the adapter has a fitted temperature: the same values' confidence before it, and after
        parts += ["Confidence before and after the adapter's temperature (fitted on dev, "
                  "jsonextract/temperature.py):\n",
                  "| confidence | values before | mean conf. before | accuracy before | values after | "
                  "mean conf. after | accuracy after |", "|---|---:|---:|---:|---:|---:|---:|"]
        parts += [f"| {a['bucket']} | {a['n']} | {f(a['mean_confidence'])} | {f(a['accuracy'])} | {b['n']} | "
                  f"{f(b['mean_confidence'])} | {f(b['accuracy'])} |" for a, b in zip(before, m["calibration"])]
        parts.append(f"\nExpected calibration error: {f(m['expected_calibration_error_uncalibrated'])} before, "
                     f"{f(m['expected_calibration_error'])} after.\n")
    else:
        parts += ["| confidence | values | mean confidence | accuracy |", "|---|---:|---:|---:|"]
        parts += [f"| {b['bucket']} | {b['n']} | {f(b['mean_confidence'])} | {f(b['accuracy'])} |"
                  for b in m["calibration"]]
        parts.append(f"\nExpected calibration error: {f(m['expected_calibration_error'])}.\n")
    pts = [b for b in m["calibration"] if b["n"]]
    if pts:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        if before:
            old = [b for b in before if b["n"]]
            ax.plot([b["mean_confidence"] for b in old], [b["accuracy"] for b in old], marker="x", ls=":",
                    label="before temperature")
        ax.plot([b["mean_confidence"] for b in pts], [b["accuracy"] for b in pts], marker="o",
                label="reported" if before else None)
        if before:
            ax.legend()
        ax.set_xlabel("mean confidence")
        ax.set_ylabel("accuracy")
        ax.set_title("calibration (per confidence bucket)")
        fig.tight_layout()
        fig.savefig(out_dir / "calibration.png", dpi=100)
        plt.close(fig)
        parts.append("![calibration.png](calibration.png)\n")
    return parts


def write_report(out_dir: Path, *, title: str, metrics: dict, baseline: dict | None, history: list[dict],
                 pred_rows: list[dict], gold_records: list, timings: dict[str, float], notes: str = "") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_history(history, out_dir)
    gold = {r.id: r.target for r in gold_records}
    texts = {r.id: r.text for r in gold_records}
    parts = [f"# {title}\n", notes, "## Test metrics\n", _headline(metrics), ""]
    if baseline:
        n = next(iter(baseline.values()))["n"]
        parts += [f"## Zero-shot base vs fine-tuned\n\nThe same {n} records spread over the split, the same "
                  "constrained decoder, scored the same way:\n", _side_by_side(baseline), ""]
    parts += ["## Timings\n", "| step | seconds |", "|---|---:|"] + \
             [f"| {k} | {v:.0f} |" for k, v in timings.items()] + [""]
    parts += ["## Curves\n"] + [f"![{p}]({p})\n" for p in plots]
    if metrics.get("grounding"):
        parts += grounding_section(metrics["grounding"], out_dir)
    parts += ["## Per-field\n", _fields(metrics), "", "## Examples\n", _examples(pred_rows, gold, texts)]
    path = out_dir / "report.md"
    path.write_text("\n".join(parts))
    return path
