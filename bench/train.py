"""Training throughput: the Ray Train job (1 and 2 workers, FSDP2) against a plain single-process PEFT loop on the
same tiny model, data and batch size, in the same run. Prints a table.

    .venv/bin/python bench/train.py            # full: 60 steps each
    .venv/bin/python bench/train.py --quick    # a few steps each (what the test suite runs)

tokens/s counts every non-pad token processed, measured over the steady state (the first logged interval, which
includes start-up, is left out); Ray start-up is reported separately as wall time minus training time.
Target: the 1-worker job within 15% of the plain loop's tokens/s.
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


def common(model: str, steps: int, log_every: int) -> list[str]:
    return [f"model.name={model}", "model.quantization=nf4", "model.max_length=256",
            f"data.train_file={DATA / 'train.jsonl'}", "data.dev_file=", "optim.batch_size=16",
            f"optim.max_steps={steps}", "optim.warmup_steps=2", "eval.every_steps=0", "eval.decode_samples=0",
            "run.checkpoint_every_steps=0", f"run.log_every_steps={log_every}", "lora.dropout=0.0"]


def plain_loop(overrides: list[str]) -> dict:
    """The baseline: load, attach LoRA, AdamW, same micro-batches, no Ray, no torch.distributed, no FSDP."""
    import torch
    from jsonextract import config as C
    from jsonextract.model import attach_lora, load_base, load_tokenizer
    from jsonextract.prompt import PromptBuilder
    from jsonextract.schema import load_schema
    from jsonextract.train_config import TrainConfig
    from jsonextract.training import check_records, micro_batches, pad_batch, peak_rss_mb, tokenize

    cfg = C.load(TrainConfig, None, overrides)
    tok = load_tokenizer(cfg.model.name)
    records, _ = check_records(cfg.data.train_file, False)
    train, _ = tokenize(records, PromptBuilder(cfg.prompt, load_schema(DATA / "schema.json")), tok, cfg.model.max_length)
    torch.manual_seed(0)
    model = attach_lora(load_base(cfg.model), cfg.lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr)
    times, tokens = [], []
    for step in range(cfg.optim.max_steps):
        t0, n = time.time(), 0.0
        for mb in micro_batches(train, step, cfg, 0, 1):
            b = pad_batch(mb, tok.pad_token_id)
            model(**b).loss.backward()
            n += float(b["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.time() - t0)
        tokens.append(n)
    skip = cfg.run.log_every_steps  # same steady-state window as the job: leave out the first interval
    return {"tokens_per_s": sum(tokens[skip:]) / sum(times[skip:]), "peak_rss_mb": peak_rss_mb(),
            "wall_s": sum(times), "startup_s": 0.0}


def job(overrides: list[str], workers: int, tmp: Path) -> dict:
    out = tmp / f"adapter-{workers}"
    # Ray sets OMP_NUM_THREADS to a worker's CPU reservation: give the workers all cores between them, as the
    # plain loop has them.
    cpus = max(2 // workers, 1)
    cmd = [sys.executable, str(ROOT / "rayjobs" / "train.py"), *overrides, f"run.num_workers={workers}",
           f"run.cpus_per_worker={cpus}",
           f"run.name=bench-{workers}", f"run.storage_path={tmp / 'runs'}", f"run.output_dir={out}"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
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
    ap.add_argument("--quick", action="store_true", help="a few steps per variant (used by the tests)")
    ap.add_argument("--model", help="base model dir (default: build a tiny one from SNIPS)")
    ap.add_argument("--_plain", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._plain:  # child process: the baseline, so its peak memory is its own
        print(json.dumps(plain_loop(json.loads(args._plain))))
        return 0
    steps, log_every = (6, 2) if args.quick else (60, 10)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model = args.model
        if not model:
            from jsonextract import config as C
            from jsonextract.tiny import build
            model = str(build(DATA, tmp / "tiny", C.load(C.TinyModelConfig, ROOT / "configs" / "tiny" / "snips.yaml")))
        ov = common(model, steps, log_every)
        t0 = time.time()
        r = subprocess.run([sys.executable, __file__, "--_plain", json.dumps(ov)], capture_output=True, text=True,
                           timeout=1800)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-3000:])
        rows = {"plain PEFT loop (1 process)": json.loads(r.stdout.strip().splitlines()[-1])}
        plain = rows["plain PEFT loop (1 process)"]
        plain["startup_s"] = time.time() - t0 - plain["wall_s"]
        plain["wall_s"] = time.time() - t0
        rows["Ray Train job, 1 worker (2 CPUs, unsharded)"] = job(ov, 1, tmp)
        rows["Ray Train job, 2 workers (1 CPU each, FSDP2)"] = job(ov, 2, tmp)
    base = rows["plain PEFT loop (1 process)"]["tokens_per_s"]
    print(f"\nQLoRA (NF4) on the tiny model, SNIPS train, batch 16/worker, {steps} steps\n")
    print("| run | tokens/s | vs plain | peak RSS MB (per process) | wall s | start-up + final save s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, m in rows.items():
        print(f"| {name} | {m['tokens_per_s']:.0f} | {m['tokens_per_s'] / base:.2f}x | {m['peak_rss_mb']:.0f} | "
              f"{m['wall_s']:.0f} | {m['startup_s']:.0f} |")
    ratio = rows["Ray Train job, 1 worker (2 CPUs, unsharded)"]["tokens_per_s"] / base
    print(f"\n1-worker job / plain loop tokens/s: {ratio:.2f} (target >= 0.85)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
