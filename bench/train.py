"""Training throughput: what each of the training loop's CPU measures buys, and the Ray Train job with 1 and 2
workers (FSDP2), against the plain single-process PEFT loop (full logits, fp32) on the same base, data and batch
size, in the same run. Prints a table.

    .venv/bin/python bench/train.py                 # SmolLM2-135M-Instruct base, 30 steps each (~25 min here)
    .venv/bin/python bench/train.py --steps 12      # shorter
    .venv/bin/python bench/train.py --quick         # tiny random model, a few steps of 4 sequences (what the tests run)

tokens/s counts every non-pad token processed over the steady state (the first logged interval, which includes
start-up, is left out); start-up is the wall time minus training time. Peak RSS is per process (each worker's).
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
BASE = "artifacts/base/smollm2-135m-instruct"

# plain-loop variants: (label, loss on answer positions only, bf16 autocast)
PLAIN = [("plain PEFT loop: full logits, fp32", False, False),
         ("plain loop + logits at answer positions only", True, False),
         ("plain loop + answer positions + bf16 autocast", True, True)]


def common(model: str, steps: int, log_every: int, batch: int, records: int) -> list[str]:
    return [f"model.name={model}", "model.quantization=nf4", "model.max_length=256",
            f"data.train_file={DATA / 'train.jsonl'}", "data.dev_file=", f"data.max_train_records={records}",
            f"optim.batch_size={batch}",
            f"optim.max_steps={steps}", "optim.warmup_steps=2", "eval.every_steps=0", "eval.decode_samples=0",
            "run.checkpoint_every_steps=0", f"run.log_every_steps={log_every}", "lora.r=16", "lora.alpha=32",
            "lora.dropout=0.0", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]


def plain_loop(overrides: list[str], answer_only: bool, bf16: bool) -> dict:
    """Load, attach LoRA, AdamW, the job's micro-batches; no Ray, no torch.distributed, no FSDP."""
    import contextlib

    import torch
    from jsonextract import config as C
    from jsonextract.model import attach_lora, keep_4bit_layout, load_base, load_tokenizer
    from jsonextract.prompt import PromptBuilder
    from jsonextract.schema import load_schema
    from jsonextract.train_config import TrainConfig
    from jsonextract.data import pad_batch
    from jsonextract.train_data import check_records, micro_batches, tokenize
    from jsonextract.training import answer_loss, peak_rss_mb

    cfg = C.load(TrainConfig, None, overrides)
    tok = load_tokenizer(cfg.model.name)
    records, _ = check_records(cfg.data.train_file, False, cfg.data.max_train_records)
    train, _ = tokenize(records, PromptBuilder(cfg.prompt, load_schema(DATA / "schema.json")), tok, cfg.model.max_length)
    torch.manual_seed(0)
    model = attach_lora(load_base(cfg.model), cfg.lora)
    keep_4bit_layout(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr)
    times, tokens = [], []
    for step in range(cfg.optim.max_steps):
        t0, n = time.time(), 0.0
        for mb in micro_batches(train, step, cfg, 0, 1):
            b = pad_batch(mb, tok.pad_token_id)
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss = answer_loss(model, b) if answer_only else model(**b).loss
            loss.backward()
            n += float(b["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.time() - t0)
        tokens.append(n)
    skip = cfg.run.log_every_steps  # same steady-state window as the job: leave out the first interval
    return {"tokens_per_s": sum(tokens[skip:]) / sum(times[skip:]), "peak_rss_mb": peak_rss_mb(),
            "wall_s": sum(times), "startup_s": 0.0}


def plain(overrides: list[str], answer_only: bool, bf16: bool) -> dict:
    """The plain loop in a child process, so its peak memory is its own."""
    t0 = time.time()
    r = subprocess.run([sys.executable, __file__, "--_plain", json.dumps([overrides, answer_only, bf16])],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    m = json.loads(r.stdout.strip().splitlines()[-1])
    m["startup_s"] = time.time() - t0 - m["wall_s"]
    m["wall_s"] = time.time() - t0
    return m


def job(overrides: list[str], workers: int, batch: int, tmp: Path, tag: str = "") -> dict:
    out = tmp / f"adapter-{workers}{tag}"
    # Ray sets OMP_NUM_THREADS to a worker's CPU reservation: give the workers all cores between them, as the
    # plain loop has them.
    cpus = max(2 // workers, 1)
    cmd = [sys.executable, str(ROOT / "rayjobs" / "train.py"), *overrides, f"run.num_workers={workers}",
           f"run.cpus_per_worker={cpus}", f"optim.batch_size={batch // workers}",
           f"run.name=bench-{workers}{tag}", f"run.storage_path={tmp / 'runs'}", f"run.output_dir={out}"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"job with {workers} workers failed:\n{r.stderr[-3000:]}")
    hist = [h for h in json.loads((out / "history.json").read_text()) if "tokens_per_s" in h]
    steady = hist[1:] or hist
    tps = sum(h["tokens_per_s"] for h in steady) / len(steady)
    train_s = sum(h["interval_s"] for h in hist)
    return {"tokens_per_s": tps, "peak_rss_mb": max(h["peak_rss_mb"] for h in hist), "wall_s": wall,
            "startup_s": wall - train_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random model, a few steps per variant (the tests)")
    ap.add_argument("--model", help=f"base model (default: {BASE}; with --quick a tiny one built from SNIPS)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of 16 sequences (--quick: 4) per variant")
    ap.add_argument("--_plain", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._plain:  # child process
        overrides, answer_only, bf16 = json.loads(args._plain)
        print(json.dumps(plain_loop(overrides, answer_only, bf16)))
        return 0
    # Quick: 4 sequences a step, so the bf16-autocast loop (emulated on CPUs without native bf16: 0.04x) stays short,
    # and only the first 256 records, which is more than it trains on: tokenising all 13,065 took ~8 s per process.
    steps, log_every, batch = (6, 2, 4) if args.quick else (args.steps, max(args.steps // 6, 1), 16)
    records = 256 if args.quick else 0
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model = args.model
        if not model and args.quick:
            from jsonextract import config as C
            from jsonextract.tiny import build
            model = str(build(DATA, tmp / "tiny", C.load(C.TinyModelConfig, ROOT / "configs" / "tiny" / "snips.yaml")))
        elif not model:
            from jsonextract.base import ensure_base
            model = str(ensure_base(ROOT / BASE))
        ov = common(model, steps, log_every, batch, records)
        two_workers = f"Ray Train job, 2 workers (1 CPU each, FSDP2, batch {batch // 2} each)"
        rows = {label: plain(ov, answer, bf16) for label, answer, bf16 in PLAIN}
        rows["Ray Train job, 1 worker (2 CPUs, unsharded)"] = job(ov, 1, batch, tmp)
        rows[two_workers] = job(ov, 2, batch, tmp)
        # Activations are most of a worker's memory (measured: 1.1 GB after loading, 5.6 GB peak in the step).
        ckpt = ["parallel.activation_checkpointing=true"]
        rows["same + activation checkpointing"] = job(ov + ckpt, 2, batch, tmp, "-ckpt")
    from jsonextract.training import cpu_has_native_bf16
    base = rows[PLAIN[0][0]]["tokens_per_s"]
    print(f"\nQLoRA (NF4, LoRA r=16 on 7 projections) on {Path(model).name}, SNIPS train, {batch} sequences per step, "
          f"{steps} steps; native bf16 on this CPU: {cpu_has_native_bf16()} (the jobs use bf16 autocast only then)\n")
    print("| run | tokens/s | vs plain | peak RSS MB (per process) | wall s | start-up + final save s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in rows.items():
        print(f"| {name} | {m['tokens_per_s']:.0f} | {m['tokens_per_s'] / base:.2f}x | {m['peak_rss_mb']:.0f} | "
              f"{m['wall_s']:.0f} | {m['startup_s']:.0f} |")
    best = max(rows, key=lambda k: rows[k]["tokens_per_s"])
    print(f"\nfastest: {best}; 2-worker job / plain full-logit fp32 loop tokens/s: "
          f"{rows[two_workers]['tokens_per_s'] / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
