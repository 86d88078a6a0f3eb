"""Single-process extraction, no Ray: read JSONL, extract, write JSONL rows like the batch job's.

    jsonextract predict --model DIR [--adapter DIR] --data FILE.jsonl --out preds.jsonl [--limit N] [--grounding snap]

For debugging on one machine and as the benchmarks' baseline. The batch job (`jsonextract extract`) is the one to
run over corpora.
"""
from __future__ import annotations

import argparse
import json
import time
import typing
from pathlib import Path

from jsonextract.config import core as C
from jsonextract.data.prompt import PromptBuilder
from jsonextract.data.records import read_jsonl
from jsonextract.data.schema import load_schema
from jsonextract.decoding.extractor import Extractor, extract_in_batches
from jsonextract.models.inference import load_for_inference
from jsonextract.models.loading import resolve_device
from jsonextract.models.manifest import temperature_of


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="jsonextract predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=C.ModelConfig().name, help="base model id or path (ignored with --adapter)")
    ap.add_argument("--adapter", help="adapter directory written by the training job")
    ap.add_argument("--data", required=True, help="input JSONL of {id, text, context?}")
    ap.add_argument("--schema", help="JSON Schema (default: the adapter's, else schema.json next to the data)")
    ap.add_argument("--out", required=True, help="output JSONL")
    ap.add_argument("--limit", type=int, default=0, help="only the first N records")
    ap.add_argument("--max-new-tokens", type=int, default=C.DecodingConfig().max_new_tokens)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: a CUDA GPU if there is one")
    ap.add_argument("--grounding", choices=typing.get_args(C.GroundingPolicy), default=C.DecodingConfig().grounding,
                    help="grounding policy (decoding.grounding; docs/decoding.md)")
    args = ap.parse_args(argv)
    lm = load_for_inference(C.ModelConfig(name=args.model), args.adapter, resolve_device(args.device))
    schema = load_schema(args.schema) if args.schema else lm.schema or load_schema(Path(args.data).with_name("schema.json"))
    ex = Extractor(lm.model, lm.tokenizer, PromptBuilder(lm.prompt, schema),
                   C.DecodingConfig(max_new_tokens=args.max_new_tokens, grounding=args.grounding),
                   temperature=temperature_of(lm.manifest))
    records = list(read_jsonl(args.data))
    records = records[: args.limit] if args.limit else records
    good = [r for r in records if r.ok]
    t0 = time.time()
    results = dict(zip([r.id for r in good], extract_in_batches(ex, [r.text for r in good], ex.cfg.batch_size,
                                                                      contexts=[r.context for r in good])))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for r in records:
            row = {"id": r.id, **results[r.id].to_row()} if r.ok else \
                {"id": r.id, "output": None, "valid": False, "error": f"bad_input: {r.error}"}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    n_valid = sum(x.valid for x in results.values())
    print(f"{len(records)} records -> {args.out}: {n_valid} valid, {len(records) - n_valid} errors, "
          f"{len(good) / (time.time() - t0):.1f} records/s")
    return 0

