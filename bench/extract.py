"""Batch extraction throughput, all on the same model and the same SNIPS test records, in one run:

- the Ray Data job (rayjobs/extract.py: 2 actors, batched, constrained) against a naive single-process loop that
  calls generate() one record at a time (constrained too);
- constrained against unconstrained decoding (same process, same batches).

    .venv/bin/python bench/extract.py [--adapter artifacts/adapters/snips] [--records 500]
    .venv/bin/python bench/extract.py --quick

It prints the ratios: job / naive rows/s, and constrained / unconstrained output tokens/s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data" / "snips"


def in_process(model: str, adapter: str | None, texts: list[str], constrained: bool, batch_size: int,
               max_new: int) -> dict:
    from jsonextract import config as C
    from jsonextract.decoding import Extractor, extract_in_batches
    from jsonextract.model import load_for_inference
    from jsonextract.prompt import PromptBuilder
    from jsonextract.schema import load_schema

    lm = load_for_inference(C.ModelConfig(name=model), adapter)
    ex = Extractor(lm.model, lm.tokenizer, PromptBuilder(lm.prompt, lm.schema or load_schema(DATA / "schema.json")),
                   C.DecodingConfig(constrained=constrained, batch_size=batch_size, max_new_tokens=max_new))
    ex.extract(texts[:2])  # warm-up: grammar compilation, first-call allocations
    t0 = time.time()
    res = extract_in_batches(ex, texts, batch_size)
    s = time.time() - t0
    tokens = sum(r.output_tokens for r in res)
    return {"rows_per_s": len(texts) / s, "output_tokens_per_s": tokens / s, "seconds": s,
            "valid": sum(r.valid for r in res) / len(res)}


def ray_job(model: str, adapter: str | None, inp: Path, out: Path, max_new: int) -> dict:
    cmd = [sys.executable, str(ROOT / "rayjobs" / "extract.py"), "--config", str(ROOT / "configs/extract/cpu.yaml"),
           f"input={inp}", f"output={out}", f"adapter={adapter or ''}", f"model.name={model}",
           f"schema={'' if adapter else DATA / 'schema.json'}", f"decoding.max_new_tokens={max_new}"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    s = json.loads((out / "_summary.json").read_text())
    return {"rows_per_s": s["rows_per_s"], "output_tokens_per_s": s["output_tokens_per_s"], "seconds": s["seconds"],
            "valid": s["valid"] / s["rows_written"], "wall": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="40 records (used by the tests)")
    ap.add_argument("--records", type=int, default=500)
    ap.add_argument("--adapter", help="adapter dir (default: artifacts/adapters/snips if present, else the base)")
    ap.add_argument("--model", help="base model without adapter (default: the SmolLM2 base; --quick: a tiny one)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    n = 40 if args.quick else args.records
    adapter = args.adapter
    if adapter is None and not args.quick and (ROOT / "artifacts/adapters/snips/manifest.json").is_file():
        adapter = str(ROOT / "artifacts/adapters/snips")
    lines = (DATA / "test.jsonl").read_text().splitlines()[:n]
    texts = [json.loads(l)["text"] for l in lines]
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model = args.model
        if not model and not args.quick:
            from jsonextract.base import DEFAULT_DIR, ensure_base
            model = str(ensure_base(ROOT / DEFAULT_DIR))
        elif not model:
            from jsonextract import config as C
            from jsonextract.tiny import build
            model = str(build(DATA, tmp / "tiny", C.load(C.TinyModelConfig, ROOT / "configs/tiny/snips.yaml")))
        inp = tmp / "in.jsonl"
        inp.write_text("\n".join(lines) + "\n")
        rows = {
            "naive loop: generate() per record, 1 process": in_process(model, adapter, texts, True, 1, args.max_new_tokens),
            "Ray Data job: 2 actors, batched (incl. actor start-up)": ray_job(model, adapter, inp, tmp / "out", args.max_new_tokens),
            "1 process, batch 32, constrained": in_process(model, adapter, texts, True, 32, args.max_new_tokens),
            "1 process, batch 32, unconstrained": in_process(model, adapter, texts, False, 32, args.max_new_tokens),
        }
    naive = rows["naive loop: generate() per record, 1 process"]["rows_per_s"]
    print(f"\n{n} SNIPS test records, model {'+ adapter ' + Path(adapter).name if adapter else '(untrained base)'}, "
          f"max_new_tokens {args.max_new_tokens}\n")
    print("| run | rows/s | vs naive | output tokens/s | valid | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in rows.items():
        print(f"| {name} | {m['rows_per_s']:.1f} | {m['rows_per_s'] / naive:.1f}x | {m['output_tokens_per_s']:.0f} | "
              f"{m['valid']:.0%} | {m['seconds']:.1f} |")
    job = rows["Ray Data job: 2 actors, batched (incl. actor start-up)"]["rows_per_s"] / naive
    c = rows["1 process, batch 32, constrained"]["output_tokens_per_s"]
    u = rows["1 process, batch 32, unconstrained"]["output_tokens_per_s"]
    cr = rows["1 process, batch 32, constrained"]["rows_per_s"]
    ur = rows["1 process, batch 32, unconstrained"]["rows_per_s"]
    print(f"\njob / naive rows/s: {job:.1f}x; constrained / unconstrained tokens/s: {c / u:.2f}; "
          f"rows/s: {cr / ur:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
