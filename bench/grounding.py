"""What grounding and confidence cost: the same records extracted with decoding.grounding=off and =annotate,
interleaved, in one process (confidence is recorded inside the same generate call; grounding runs after it).

    .venv/bin/python bench/grounding.py [--adapter artifacts/adapters/snips] [--records 128] [--reps 3]
    .venv/bin/python bench/grounding.py --quick

Prints the best-of-reps seconds per variant and the ratio annotate / off.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import results

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "snips"


def measure() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, 32 records, 2 reps (the tests)")
    ap.add_argument("--adapter", help="adapter dir (default: the untrained tiny model)")
    ap.add_argument("--records", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    from jsonextract.config import core as C
    from jsonextract.decoding.extractor import Extractor, extract_in_batches
    from jsonextract.models.inference import load_for_inference
    from jsonextract.data.prompt import PromptBuilder
    from jsonextract.data.schema import load_schema

    n, reps = (32, 2) if args.quick else (args.records, args.reps)
    lines = (DATA / "test.jsonl").read_text().splitlines()
    texts = [json.loads(lines[i * len(lines) // n])["text"] for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        if args.adapter:
            lm = load_for_inference(C.ModelConfig(), args.adapter)
            label = f"adapter {Path(args.adapter).name}"
        else:
            from jsonextract.models.tiny import build
            model = build(DATA, Path(tmp) / "tiny", C.load(C.TinyModelConfig, ROOT / "configs/tiny/snips.yaml"))
            lm = load_for_inference(C.ModelConfig(name=str(model)), None)
            lm.schema, label = load_schema(DATA / "schema.json"), "untrained tiny model"
        base = C.DecodingConfig(max_new_tokens=96, batch_size=32)
        seconds: dict[str, list[float]] = {"off": [], "annotate": []}
        for rep in range(reps + 1):  # the first round warms up and is not counted
            for policy in seconds:
                ex = Extractor(lm.model, lm.tokenizer, PromptBuilder(lm.prompt, lm.schema),
                               dataclasses.replace(base, grounding=policy))
                t0 = time.perf_counter()
                results = extract_in_batches(ex, texts, base.batch_size)
                if rep:
                    seconds[policy].append(time.perf_counter() - t0)
        tokens = sum(r.output_tokens for r in results)
    best = {k: min(v) for k, v in seconds.items()}
    print(f"\n{n} SNIPS test records, batch 32, {label}, best of {reps} interleaved runs\n")
    print("| decoding.grounding | seconds | output tokens/s |")
    print("|---|---:|---:|")
    for k, s in best.items():
        print(f"| {k} | {s:.2f} | {tokens / s:.0f} |")
    print(f"\nannotate / off time = {best['annotate'] / best['off']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(results.main("grounding", measure))
