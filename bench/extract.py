"""Batch extraction speed: each decoding measure against step-by-step decoding, same records, same adapter, in one
run, on each data set given (SNIPS and Restaurant-8k test by default, with the main jobs' adapters):

- in one process, batch 32: `model.generate()` with grammar masks over the NF4 base + LoRA (the previous
  decoding path, `decoding.engine=generate model.inference_weights=nf4 model.inference_attention=sdpa`), then the
  decoding loop step by step, + jump-forward, + the shared prompt prefix, + grouped query heads packed in attention
  (`jsonextract/attention.py`), + dequantised weights with the adapter merged (the defaults), the defaults
  unconstrained, the dequantised weights step by step, the defaults with the whole prompt in one left-padded pass
  instead of length groups, and the defaults at the batch job's batch size (configs/extract/cpu.yaml), with and
  without length groups, with the model's own full vocabulary projection instead of the loop's
  (`vocab_head.VocabHead`: allowed tokens only), with transformers' own sdpa attention, and where the defaults run
  attention's products in bf16 (`attention.HALF`), with the packed attention in fp32;
- the Ray Data job (`jsonextract extract`, configs/extract/cpu.yaml, 2 actors) on the previous path (as the job was
  configured before: generate(), NF4, transformers' sdpa, batch 32) against the defaults (the config's), first on an empty
  merged-weights cache (the replicas build the adapter's merged weights and write them), then again (the
  replicas read them: what every later job of that adapter does); where the defaults run in bf16, also the job with
  attention in fp32 and the job in fp32 weights.

    .venv/bin/python bench/extract.py [--sets snips=artifacts/adapters/snips,restaurant8k=artifacts/adapters/restaurant8k]
                                      [--records 96] [--job-records 400] [--ablations]
    .venv/bin/python bench/extract.py --quick      (tiny random model, 16 SNIPS records: what the tests run)

Per variant: rows/s, output tokens/s, forward passes, share of output tokens that jump-forward emitted without a
pass of their own, rows whose output is identical to the previous path's, field F1. A roofline line compares
the positions computed per second with a probe: a pass through random matrices of the model's shapes, at 1 and
32 rows, on this machine. The last line is
`speedup: job rows/s vs step-by-step decoding on the same base = X.XXx; field F1 delta = +/-Y.YY`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results

ROOT = Path(__file__).resolve().parents[1]

from jsonextract.hardware import matmul_params, pass_seconds  # noqa: E402

STEP = {"jump_forward": False, "prefix_cache": False}  # the decoding loop, one forward pass per token


def job_batch() -> int:
    """configs/extract/cpu.yaml's decoding.batch_size: the batch the job's replicas decode at."""
    from jsonextract.config.core import load
    from jsonextract.config.extract import ExtractConfig
    return load(ExtractConfig, ROOT / "configs/extract/cpu.yaml", []).decoding.batch_size


JOB_BATCH = job_batch()
PREVIOUS_JOB = ["model.inference_weights=nf4", "decoding.engine=generate",  # as the job was configured before
                "model.inference_attention=sdpa", "decoding.batch_size=32", "pool.batch_rows=64", "pool.max_batch_tokens=4096"]
DEFAULTS = {"engine": "loop", "jump_forward": True, "prefix_cache": True, "constrained": True, "batch_size": 32}
REFERENCE = {"engine": "generate"}  # transformers' generate() with grammar masks: the previous decoding path
BASELINE = "generate(), step by step, NF4 base + LoRA (previous path)"
PREVIOUS_JOB_LABEL = "Ray Data job, generate() step by step, NF4, batch 32 (previous path)"
FIRST_LOAD = "Ray Data job, defaults, first load of the adapter (merged weights built and cached)"
DEFAULTS_JOB = "Ray Data job, defaults"
FP32 = "defaults in fp32 weights (model.inference_dtype=float32)"
WHOLE_BF16 = "defaults with the whole model cast to bf16 (residual stream and cache too)"
FP32_ATTENTION = "defaults with attention in fp32 (model.inference_attention=packed)"


# ---------------------------------------------------------------------------------------------- variants


def extractor(model: str, adapter: str | None, schema_file: Path, weights: str, max_new: int, dtype: str = "auto",
              **decoding):
    from jsonextract.config import core as C
    from jsonextract.decoding.extractor import Extractor
    from jsonextract.models.inference import load_for_inference
    from jsonextract.data.prompt import PromptBuilder
    from jsonextract.data.schema import load_schema

    lm = load_for_inference(C.ModelConfig(name=model, inference_weights=weights, inference_dtype=dtype,
                                          merged_cache=""), adapter)
    cfg = C.DecodingConfig(batch_size=32, max_new_tokens=max_new, grounding="off", **decoding)
    return Extractor(lm.model, lm.tokenizer, PromptBuilder(lm.prompt, lm.schema or load_schema(schema_file)), cfg)


def run_variant(ex, texts, targets, **decoding) -> dict:
    from jsonextract.decoding.extractor import extract_in_batches
    from jsonextract.decoding.generated import DecodeStats
    from jsonextract.evaluation.metrics import score_results
    from jsonextract.models.precision import matmul_dtype
    import torch

    ex.cfg = dataclasses.replace(ex.cfg, **decoding)
    ex.weights_changed()
    ex.stats = DecodeStats()
    t0 = time.perf_counter()
    res = extract_in_batches(ex, texts, ex.cfg.batch_size)
    s = time.perf_counter() - t0
    st = ex.stats.as_dict()
    tokens = sum(r.output_tokens for r in res)
    return {"rows_per_s": len(texts) / s, "tokens_per_s": tokens / s, "seconds": s, "raw": [r.raw for r in res],
            "passes": st["forward_passes"], "forced": st["forced_share"], "fed": st["fed"], "padding": st["padding"],
            "f1": score_results(zip(res, targets), ex.default_schema)["f1"], "tokens": tokens,
            "prompt_tokens": sum(r.input_tokens for r in res), "bf16": matmul_dtype(ex.model) == torch.bfloat16}


def ray_job(model: str, adapter: str | None, schema_file: Path, inp: Path, out: Path, max_new: int,
            overrides: list[str]) -> dict:
    cmd = [str(Path(sys.executable).with_name("jsonextract")), "extract", "--config", str(ROOT / "configs/extract/cpu.yaml"),
           f"input={inp}", f"output={out}", f"adapter={adapter or ''}", f"model.name={model}",
           f"schema={'' if adapter else schema_file}", f"decoding.max_new_tokens={max_new}",
           'decoding.grounding="off"', *overrides]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    s = json.loads((out / "_summary.json").read_text())
    m = json.loads((out / "_metrics.json").read_text())
    loads = [float(x) for x in re.findall(r"replica ready on \w+: model loaded in ([0-9.]+) s", r.stdout)]
    return {"rows_per_s": s["rows_per_s"], "tokens_per_s": s["output_tokens_per_s"], "seconds": s["seconds"],
            "f1": m["f1"], "valid": s["valid"] / s["rows_written"], "load_s": max(loads, default=float("nan"))}


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------- one data set


@contextlib.contextmanager
def one_prompt_pass():
    """The decoding loop as it was before prompts were computed in length groups: one left-padded pass."""
    from jsonextract.decoding import loop
    groups = loop.length_groups
    loop.length_groups = lambda lengths, overhead: [list(range(len(lengths)))]
    try:
        yield
    finally:
        loop.length_groups = groups


@contextlib.contextmanager
def attention_as(ex, name: str = "sdpa"):
    """Another attention for the block: by default transformers' own sdpa, which copies the key/value cache for
    every query head (model.inference_attention=sdpa); attention.NAME, the packed attention in the cache's dtype
    (model.inference_attention=packed: fp32 where the defaults run attention's products in bf16)."""
    impl = ex.model.config._attn_implementation
    ex.model.set_attn_implementation(name)
    try:
        yield
    finally:
        ex.model.set_attn_implementation(impl)


@contextlib.contextmanager
def model_projection():
    """The decoding loop as it was before it projected onto the vocabulary itself: the model's full logits."""
    from jsonextract.decoding.vocab_head import VocabHead
    for_model = VocabHead.for_model
    VocabHead.for_model = classmethod(lambda cls, model: None)
    try:
        yield
    finally:
        VocabHead.for_model = for_model


def spread(lines: list[str], n: int) -> list[str]:
    return lines[::max(len(lines) // n, 1)][:n]


def bench_set(name: str, data: Path, model: str, adapter: str | None, n: int, max_new: int, tmp: Path,
              job_rows: int, ablations: bool, quick: bool) -> dict:
    all_lines = (data / "test.jsonl").read_text().splitlines()
    lines = spread(all_lines, n)
    recs = [json.loads(l) for l in lines]
    texts, targets = [r["text"] for r in recs], [r.get("target") for r in recs]
    import torch
    from jsonextract.models import attention as attention
    from jsonextract.models.precision import matmul_dtype

    schema = data / "schema.json"
    rows: dict[str, dict] = {}
    probe = pass_seconds(model, 1), pass_seconds(model, 32), pass_seconds(model, 32, dtype="bfloat16")  # before the rest
    ex = extractor(model, adapter, schema, "nf4", max_new)
    ex.extract(texts[:2])  # warm-up: grammar compilation, first-call allocations
    with attention_as(ex):
        rows[BASELINE] = run_variant(ex, texts, targets, **REFERENCE)
        rows["decoding loop, step by step, NF4"] = run_variant(ex, texts, targets, engine="loop", **STEP)
        rows["+ jump-forward"] = run_variant(ex, texts, targets, jump_forward=True, prefix_cache=False)
        rows["+ shared prefix"] = run_variant(ex, texts, targets, jump_forward=True, prefix_cache=True)
    rows["+ grouped query heads packed in attention (no cache copies)"] = run_variant(ex, texts, targets)
    del ex
    ex = extractor(model, adapter, schema, "dequantized", max_new)
    ex.extract(texts[:2])
    rows["+ dequantized weights, adapter merged (defaults)"] = run_variant(ex, texts, targets, **DEFAULTS)
    rows["defaults, unconstrained"] = run_variant(ex, texts, targets, constrained=False)
    rows["dequantized weights, step by step"] = run_variant(ex, texts, targets, constrained=True, **STEP)
    with one_prompt_pass():
        rows["defaults without prompt length groups (one prompt pass)"] = run_variant(ex, texts, targets, **DEFAULTS)
    rows[f"defaults, batch {JOB_BATCH} (the job's)"] = run_variant(ex, texts, targets,
                                                                  **{**DEFAULTS, "batch_size": JOB_BATCH})
    with one_prompt_pass():
        rows[f"defaults, batch {JOB_BATCH}, one prompt pass"] = run_variant(
            ex, texts, targets, **{**DEFAULTS, "batch_size": JOB_BATCH})
    with model_projection():
        rows[f"defaults, batch {JOB_BATCH}, the model's full vocabulary projection"] = run_variant(
            ex, texts, targets, **{**DEFAULTS, "batch_size": JOB_BATCH})
    with attention_as(ex):
        rows[f"defaults, batch {JOB_BATCH}, transformers' sdpa (cache copied per query head)"] = run_variant(
            ex, texts, targets, **{**DEFAULTS, "batch_size": JOB_BATCH})
    dtype = str(matmul_dtype(ex.model)).removeprefix("torch.")
    if ex.model.config._attn_implementation == attention.HALF:  # attention's products in bf16: the same in fp32
        with attention_as(ex, attention.NAME):
            rows[f"{FP32_ATTENTION}, batch {JOB_BATCH}"] = run_variant(ex, texts, targets,
                                                                     **{**DEFAULTS, "batch_size": JOB_BATCH})
    if dtype != "float32":  # auto chose bf16 (measured faster here): the same in fp32 weights
        del ex
        ex = extractor(model, adapter, schema, "dequantized", max_new, dtype="float32")
        ex.extract(texts[:2])
        rows[FP32] = run_variant(ex, texts, targets, **DEFAULTS)
        rows[f"{FP32}, batch {JOB_BATCH}"] = run_variant(ex, texts, targets, **{**DEFAULTS, "batch_size": JOB_BATCH})
        with attention_as(ex):
            rows[f"{FP32}, batch {JOB_BATCH}, transformers' sdpa"] = run_variant(
                ex, texts, targets, **{**DEFAULTS, "batch_size": JOB_BATCH})
        ex.model.to(torch.bfloat16)  # the same fp32 merge, rounded once, but residual stream and cache in bf16 too
        attention.set_inference_attention(ex.model, "auto")  # what model.dtype=bfloat16 loads with
        ex.weights_changed()
        rows[f"{WHOLE_BF16}, batch {JOB_BATCH}"] = run_variant(ex, texts, targets, **{**DEFAULTS, "batch_size": JOB_BATCH})
    if ablations:  # the two choices of the jump-forward design, each undone alone
        ex._cost.overhead_positions = lambda: 1e9  # every row padded to the longest draft
        rows["ablation: defaults, every pass as wide as the longest draft"] = run_variant(ex, texts, targets,
                                                                                         **DEFAULTS)
        ex._drafter = lambda m: m.find_jump_forward_tokens()
        rows["ablation: that, drafts of xgrammar's longest-token match"] = run_variant(ex, texts, targets)
    del ex
    jobs = {}
    if job_rows:
        inp = tmp / f"{name}.jsonl"
        inp.write_text("\n".join(spread(all_lines, job_rows)) + "\n")
        jobs[PREVIOUS_JOB_LABEL] = ray_job(
            model, adapter, schema, inp, tmp / f"{name}-step", max_new, PREVIOUS_JOB)
        # The defaults' replicas read the adapter's merged weights from model.merged_cache once a load has
        # written them: the first job on an empty cache builds them (as every job did before the cache).
        cache = [f"model.merged_cache={tmp / f'{name}-merged'}"]
        if not quick:
            jobs[FIRST_LOAD] = ray_job(model, adapter, schema, inp, tmp / f"{name}-first", max_new, cache)
        jobs[DEFAULTS_JOB] = ray_job(model, adapter, schema, inp, tmp / f"{name}-fast", max_new, cache)
        if dtype != "float32":
            jobs[f"Ray Data job, {FP32_ATTENTION}"] = ray_job(model, adapter, schema, inp, tmp / f"{name}-packed",
                                                              max_new, [*cache, "model.inference_attention=packed"])
            jobs[f"Ray Data job, {FP32}"] = ray_job(model, adapter, schema, inp, tmp / f"{name}-fp32", max_new,
                                                    [*cache, "model.inference_dtype=float32"])
    return {"n": len(texts), "rows": rows, "jobs": jobs, "probe": probe, "adapter": adapter,
            "job_rows": min(job_rows, len(all_lines)), "dtype": dtype}


def report(name: str, r: dict, model: str) -> tuple[float | None, float]:
    rows, jobs = r["rows"], r["jobs"]
    step = rows["decoding loop, step by step, NF4"]
    base = rows[BASELINE]
    flops_per_token = 2 * matmul_params(model)
    one, full, full_bf16 = r["probe"]
    peak = flops_per_token * 32 / full / 1e9
    peak_bf16 = flops_per_token * 32 / full_bf16 / 1e9
    print(f"\n{name}: {r['n']} test records, {'adapter ' + Path(r['adapter']).name if r['adapter'] else 'untrained model'}"
          f", batch 32 unless the row says otherwise, one process ({torch_threads()} threads); the defaults' "
          f"inference dtype on this CPU: {r['dtype']} (model.inference_dtype=auto)\n")
    print("| variant | rows/s | vs previous path | output tokens/s | forward passes | output tokens without a pass "
          "of their own | positions computed (padding) | matmul GFLOP/s (of the 32-row probe in its dtype) | output identical to previous "
          "path | field F1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, m in rows.items():  # GFLOP/s: the matmul work of the positions computed per second
        same = sum(a == b for a, b in zip(m["raw"], base["raw"]))
        gflops = m["fed"] * flops_per_token / m["seconds"] / 1e9
        print(f"| {label} | {m['rows_per_s']:.2f} | {m['rows_per_s'] / base['rows_per_s']:.2f}x | "
              f"{m['tokens_per_s']:.0f} | {m['passes']} | {m['forced']:.0%} | {m['fed']} ({m['padding'] / m['fed']:.0%}) | "
              f"{gflops:.1f} ({gflops / (peak_bf16 if m['bf16'] else peak):.0%}) | {same}/{r['n']} | {100 * m['f1']:.1f} |")
    if jobs:
        print(f"\nThe Ray Data job (2 actors of half a CPU, start-up included), {r['job_rows']} records:\n")
        print("| job | rows/s | vs previous path | output tokens/s | seconds | slowest replica's model load (s) "
              "| field F1 |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        first = next(iter(jobs.values()))
        for label, m in jobs.items():
            print(f"| {label} | {m['rows_per_s']:.2f} | {m['rows_per_s'] / first['rows_per_s']:.2f}x | "
                  f"{m['tokens_per_s']:.0f} | {m['seconds']:.0f} | {m['load_s']:.1f} | {100 * m['f1']:.1f} |")
    d, u = rows["+ dequantized weights, adapter merged (defaults)"], rows["defaults, unconstrained"]
    big = rows[f"defaults, batch {JOB_BATCH} (the job's)"]
    print(f"\nroofline: {flops_per_token / 1e9:.3f} GFLOP of matmul per position computed (2 x "
          f"{matmul_params(model) / 1e6:.1f}M weights, lm_head included). The probe (the model's matrices, random "
          f"fp32, {torch_threads()} threads) took {one * 1000:.0f} ms for a pass of 1 row and {full * 1000:.0f} ms "
          f"for 32 rows: at most {32 / full:.0f} positions/s in 32-row passes ({peak:.1f} GFLOP/s; in bf16 "
          f"{full_bf16 * 1000:.0f} ms, {flops_per_token * 32 / full_bf16 / 1e9:.1f} GFLOP/s). The defaults "
          f"computed {d['fed'] / d['seconds']:.0f} positions/s at batch 32 ({d['fed'] / max(d['tokens'], 1):.2f} per "
          f"output token, {d['tokens_per_s']:.0f} output tokens/s) and {big['fed'] / big['seconds']:.0f} at batch "
          f"{JOB_BATCH} ({big['tokens_per_s']:.0f} output tokens/s)")
    print(f"forward passes: step by step {step['passes']} -> jump-forward "
          f"{rows['+ jump-forward']['passes']} ({1 - rows['+ jump-forward']['passes'] / step['passes']:.0%} fewer)")
    print(f"constrained / unconstrained output tokens/s (defaults): {d['tokens_per_s'] / u['tokens_per_s']:.2f}")
    if jobs:
        js, jf = jobs[PREVIOUS_JOB_LABEL], jobs[DEFAULTS_JOB]
        first = jobs[FIRST_LOAD]["seconds"] if FIRST_LOAD in jobs else None
        return (js["seconds"], jf["seconds"], first), 100 * (jf["f1"] - js["f1"])
    return None, 100 * (d["f1"] - base["f1"])


def measure() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random model, 16 SNIPS records (used by the tests)")
    ap.add_argument("--records", type=int, default=96, help="test records per data set for the in-process variants")
    ap.add_argument("--job-records", type=int, default=400, help="test records per data set for the Ray Data jobs "
                                                               "(more than --records: a job starts Ray and its actors)")
    ap.add_argument("--sets", help="name=adapter_dir,... (data/<name>; default: snips and restaurant8k with "
                                   "artifacts/adapters/<name> where present)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--no-job", action="store_true", help="skip the Ray Data jobs")
    ap.add_argument("--ablations", action="store_true", help="also jump-forward with full-width passes, and with "
                                                             "xgrammar's token drafts")
    args = ap.parse_args()
    if args.sets:
        sets = {k: v or None for k, v in (s.split("=", 1) for s in args.sets.split(","))}
    elif args.quick:
        sets = {"snips": None}
    else:
        sets = {k: str(ROOT / "artifacts/adapters" / k) for k in ("snips", "restaurant8k")
                if (ROOT / "artifacts/adapters" / k / "manifest.json").is_file()} or {"snips": None}
    n = 16 if args.quick else args.records
    max_new = 48 if args.quick else args.max_new_tokens
    times, deltas = [], []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if args.quick:
            from jsonextract.config import core as C
            from jsonextract.models.tiny import build
            model = str(build(ROOT / "data/snips", tmp / "tiny", C.load(C.TinyModelConfig, ROOT / "configs/tiny/snips.yaml")))
        else:
            from jsonextract.models.base import DEFAULT_DIR, ensure_base
            model = str(ensure_base(ROOT / DEFAULT_DIR))
        for name, adapter in sets.items():
            job_rows = 0 if args.no_job else (16 if args.quick else args.job_records)
            r = bench_set(name, ROOT / "data" / name, model, adapter, n, max_new, tmp, job_rows, args.ablations,
                          args.quick)
            t, dl = report(name, r, model)
            if t is not None:
                times.append(t)
            deltas.append(dl)
    # Over all data sets: the same rows in both jobs, so the rows/s ratio is the ratio of total job seconds.
    sp_txt = f"{sum(t[0] for t in times) / sum(t[1] for t in times):.2f}x" if times else "n/a (--no-job)"
    if times and all(t[2] for t in times):
        print(f"\nfirst job on an empty merged-weights cache: {sum(t[0] for t in times) / sum(t[2] for t in times):.2f}x "
              "the previous path's rows/s")
    worst = max(deltas, key=abs)
    print(f"\nspeedup: job rows/s vs step-by-step decoding on the same base = {sp_txt}; "
          f"field F1 delta = {worst:+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(results.main("extract", measure))
