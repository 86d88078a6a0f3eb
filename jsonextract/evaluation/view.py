"""A static HTML page for reviewing a batch job's extractions: each record's text with every extracted value
highlighted where it was found (hover: field, match kind, confidence), values not found in the text flagged,
and the JSON beside it. No server, no external assets.

    jsonextract view <output folder> --input <input JSONL> --out review.html [--limit 200]
"""
from __future__ import annotations

import argparse
import html
import json
from pathlib import Path

from jsonextract.data.io import read_results
from jsonextract.data.records import json_value, read_jsonl
from jsonextract.errors import UserError

STYLE = """body{font:14px/1.5 system-ui,sans-serif;margin:20px;color:#1d2327}
.rec{border:1px solid #dde1e6;border-radius:6px;padding:10px 14px;margin:10px 0;display:grid;
grid-template-columns:3fr 2fr;gap:14px}.id{color:#6b7280;font-size:12px}.text{white-space:pre-wrap;line-height:1.9}
mark{background:#cfe8ff;border-bottom:2px solid #2563eb}mark.normalized{background:#dff5e3;border-color:#16a34a}
mark.fuzzy{background:#fff1c2;border-color:#ca8a04}.ungrounded{color:#b91c1c;font-weight:600}
pre{background:#f3f4f6;padding:6px;border-radius:4px;margin:0;font-size:12px;white-space:pre-wrap}
.err{color:#b91c1c}"""


def highlight(text: str, grounding: dict, confidence: dict) -> str:
    spans = sorted(((p, g) for p, g in grounding.items() if g and "start" in g),
                   key=lambda x: (x[1]["start"], -x[1]["end"]))
    out, pos = [], 0
    for path, g in spans:
        if g["start"] < pos:
            continue
        conf = f" · confidence {confidence[path]:.2f}" if path in confidence else ""
        out.append(html.escape(text[pos:g["start"]]))
        out.append(f'<mark class="{g["match"]}" data-path="{html.escape(path)}" '
                   f'title="{html.escape(path)} ({g["match"]}){conf}">{html.escape(text[g["start"]:g["end"]])}</mark>')
        pos = g["end"]
    return "".join(out) + html.escape(text[pos:])


def render(rows: list[dict], texts: dict[str, str]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>extractions</title><style>{STYLE}</style>"
             f"</head><body><h1>Extractions ({len(rows)} records)</h1>"]
    for r in rows:
        text = texts.get(str(r["id"]), "")
        g, c = json_value(r.get("grounding"), {}), json_value(r.get("confidence"), {})
        flagged = [p for p, v in g.items() if v is None]
        right = (f"<pre>{html.escape(json.dumps(json_value(r['output'], {}), indent=1, ensure_ascii=False))}</pre>"
                 if r.get("valid") else f"<div class='err'>{html.escape(str(r.get('error')))}</div>")
        if flagged:
            right += "<div class='ungrounded'>not in the text: " + ", ".join(html.escape(p) for p in flagged) + "</div>"
        snapped = json_value(r.get("snapped"), {})
        if snapped:
            right += "<div>snapped to the text: " + ", ".join(
                f"{html.escape(p)} (the model wrote {html.escape(json.dumps(v, ensure_ascii=False))})"
                for p, v in snapped.items()) + "</div>"
        dropped = json_value(r.get("dropped"), [])
        if dropped:
            right += "<div class='ungrounded'>dropped: " + ", ".join(html.escape(p) for p in dropped) + "</div>"
        parts.append(f"<div class='rec'><div><div class='id'>{html.escape(str(r['id']))}</div>"
                     f"<div class='text'>{highlight(text, g, c)}</div></div><div>{right}</div></div>")
    return "\n".join(parts + ["</body></html>"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jsonextract view", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", help="the batch job's output folder (or a result file)")
    ap.add_argument("--input", required=True, help="the JSONL the job read (the texts: output rows carry ids only)")
    ap.add_argument("--out", default="review.html", help="HTML file to write")
    ap.add_argument("--limit", type=int, default=200, help="records on the page (0 = all)")
    args = ap.parse_args(argv)
    rows = sorted(read_results(args.output), key=lambda r: str(r["id"]))
    texts = {r.id: r.text for r in read_jsonl(args.input) if r.text is not None}
    if not rows:
        raise UserError(f"no result rows in {args.output}")
    rows = rows[:args.limit] if args.limit else rows
    Path(args.out).write_text(render(rows, texts), encoding="utf-8")
    print(f"wrote {args.out}: {len(rows)} records")
    return 0

