"""Training throughput: the training job as it is configured now against the previous job, side by side in one
run on the same base, data, batch and steps, plus where one training step's time goes.

- Where the time goes: one process (no Ray, no FSDP), the job's defaults, a few steps profiled with
  torch.profiler; each operator's own time is put in one part (4-bit dequantisation, LoRA branches, attention,
  the base's projections, the vocabulary head and loss, dtype casts, optimizer, collectives, the rest), with the
  forward / backward / optimizer split timed by the clock, and the padding share of the positions computed; the
  previous job's settings, the defaults with peft's own LoRA layers (parallel.lora_kernel=peft), and the defaults.
- The jobs (`jsonextract train`, Ray Train, FSDP2 over the NF4 base): the previous job (`PREVIOUS`: plain shuffle,
  SDPA attention, the model's own logits, peft's LoRA layers, the frozen base sharded), the main job's settings
  (the defaults plus configs/train/snips_cpu.yaml's `parallel` section) with 2 workers of 1 CPU, the same with the
  frozen base sharded too (not under --quick), and with 1 worker of 2 CPUs (unsharded).

    .venv/bin/python bench/train.py                 # SmolLM2-135M-Instruct base, 30 steps of 32 per job (~20 min)
    .venv/bin/python bench/train.py --steps 12      # shorter
    .venv/bin/python bench/train.py --quick         # tiny random model, a few steps (what the tests run)

tokens/s counts every non-pad token processed over the steady state (the first logged interval, which includes
start-up, is left out). The table goes to stdout and to bench/results/<cpu>-<isa>-train.md. The last line is
`speedup: training job tokens/s vs the previous job on the same machine = X.XXx`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import results

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "snips"
BASE = "artifacts/base/smollm2-135m-instruct"

# The training job before the throughput work, reachable by settings.
PREVIOUS = ["data.length_group_steps=0", "parallel.attention=sdpa", "optim.loss=logits", "parallel.lora_kernel=peft"]
JOB = "the main job's settings (configs/train/snips_cpu.yaml), 2 workers x 1 CPU, FSDP2"
MAIN_CONFIG = ROOT / "configs" / "train" / "snips_cpu.yaml"


def main_job_parallel() -> list[str]:
    """The main job's `parallel` settings, read from its config, so that the job measured is the job users run."""
    from jsonextract.config import core as C
    from jsonextract.config.train import TrainConfig
    p = C.to_dict(C.load(TrainConfig, MAIN_CONFIG).parallel)
    return [f"parallel.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in p.items()]


def common(model: str, steps: int, log_every: int, records: int) -> list[str]:
    return [f"model.name={model}", "model.quantization=nf4", "model.max_length=256",
            f"data.train_file={DATA / 'train.jsonl'}", "data.dev_file=", f"data.max_train_records={records}",
            f"optim.max_steps={steps}", "optim.warmup_steps=2", "eval.every_steps=0", "eval.decode_samples=0",
            "run.checkpoint_every_steps=0", f"run.log_every_steps={log_every}", "lora.r=16", "lora.alpha=32",
            "lora.dropout=0.0", "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]


PARTS = ["4-bit dequantisation", "base projections (matmul)", "LoRA branches (matmul)", "attention",
         "vocabulary head + loss", "dtype casts (autocast)", "optimizer step", "collectives", "rest (norms, "
         "activations, elementwise, framework)"]


def part_of(name: str, shapes: list) -> str:
    """Which part of a training step an operator's own time belongs to (by name and input shapes)."""
    if "dequantize" in name:
        return PARTS[0]
    if name in ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul"):
        dims = [d for s in shapes if isinstance(s, list) for d in s]
        if any(d >= 16384 for d in dims):  # a vocabulary-sized dimension
            return PARTS[4]
        if any(0 < d <= 64 for d in dims):  # the LoRA rank
            return PARTS[2]
        return PARTS[1]
    if name in ("aten::bmm", "aten::baddbmm") or "attention" in name or "softmax" in name and "log" not in name:
        return PARTS[3]
    if "logsumexp" in name or "log_softmax" in name or "nll_loss" in name or "scatter" in name or "gather" in name:
        return PARTS[4]
    if name in ("aten::copy_", "aten::_to_copy", "aten::to"):
        return PARTS[5]
    if "c10d" in name or "gloo" in name or "all_gather" in name or "reduce_scatter" in name or "all_reduce" in name:
        return PARTS[7]
    if "_foreach" in name or "adam" in name.lower():
        return PARTS[6]
    return PARTS[8]


def breakdown(overrides: list[str], steps: int) -> dict:
    """One process, the defaults: clock times of forward / backward / optimizer, and the profiler's parts."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from jsonextract.config import core as C
    from jsonextract.data.records import pad_batch
    from jsonextract.training.loss import answer_loss
    from jsonextract.models.loading import load_tokenizer
    from jsonextract.data.prompt import PromptBuilder
    from jsonextract.data.schema import load_schema
    from jsonextract.training.distributed import Worker
    from jsonextract.config.train import TrainConfig
    from jsonextract.training.batches import check_records, micro_batches, tokenize
    from jsonextract.training.recipe import agree_on_autocast, autocast, build_model

    cfg = C.load(TrainConfig, None, overrides)
    worker = Worker(0, 1, 0, torch.device("cpu"), False, "here")
    bf16 = agree_on_autocast(cfg, worker)
    tok = load_tokenizer(cfg.model.name)
    records, _ = check_records(cfg.data.train_file, False, cfg.data.max_train_records)
    train, _ = tokenize(records, PromptBuilder(cfg.prompt, load_schema(DATA / "schema.json")), tok, cfg.model.max_length)
    torch.manual_seed(0)
    model = build_model(cfg, worker)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr)
    clock: dict[str, float] = defaultdict(float)
    tokens, positions, answers = 0.0, 0.0, 0.0

    def step(s: int) -> None:
        nonlocal tokens, positions, answers
        for mb in micro_batches(train, s, cfg, 0, 1):
            b = pad_batch(mb, tok.pad_token_id)
            t0 = time.perf_counter()
            with autocast(bf16):
                loss = answer_loss(model, b, fused=cfg.optim.loss == "fused")
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            clock["forward"] += t1 - t0
            clock["backward"] += t2 - t1
            tokens += float(b["attention_mask"].sum())
            positions += b["attention_mask"].numel()
            answers += float((b["labels"] != -100).sum())
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock["optimizer"] += time.perf_counter() - t0

    for s in range(2):  # warm-up: kernels built for the first shapes
        step(s)
    clock.clear()
    tokens = positions = answers = 0.0
    for s in range(2, 2 + steps):  # timed by the clock alone: the profiler slows the many small operators
        step(s)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step(2 + steps)
    scale = sum(clock.values()) / steps / max(sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6, 1e-9)
    parts: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.key.startswith(("autograd::", "Optimizer.", "ProfilerStep", "MatMul4Bit", "LoraLinear4bit", "[memory]")):
            continue  # ranges whose children carry the time
        parts[part_of(ev.key, ev.input_shapes)] += ev.self_cpu_time_total / 1e6 * scale
    # parts: the profiled step's shares of operator time, scaled to the clock's seconds per step
    return {"clock": {k: v / steps for k, v in clock.items()}, "parts": dict(parts),
            "tokens_per_step": tokens / steps, "pad_share": 1 - tokens / positions, "answer_share": answers / tokens}


def in_children(variants: list[list[str]], steps: int, per_child: int) -> list[dict]:
    """`breakdown` of each variant in child processes, `per_child` variants to a process: the profiler's records
    (gigabytes at the full bench's sizes, so one variant per process there) go with the process, and at --quick's
    sizes one process spares the others their start-up (imports, tokenising, building the model)."""
    out: list[dict] = []
    for i in range(0, len(variants), per_child):
        group = [[v, steps] for v in variants[i:i + per_child]]
        r = subprocess.run([sys.executable, __file__, "--_breakdown", json.dumps(group)],
                           capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-3000:])
        out += json.loads(r.stdout.strip().splitlines()[-1])
    return out


def job(overrides: list[str], workers: int, batch: int, tmp: Path, tag: str, short: str) -> dict:
    out = tmp / f"adapter-{tag}"
    # Ray sets OMP_NUM_THREADS to a worker's CPU reservation: the workers get all cores between them.
    cpus = max((os.cpu_count() or 2) // workers, 1)
    cmd = [str(Path(sys.executable).with_name("jsonextract")), "train", *overrides, f"run.num_workers={workers}",
           f"run.cpus_per_worker={cpus}", f"optim.batch_size={batch // workers}",
           f"run.name=bench-{tag}", f"run.storage_path={tmp / 'runs'}", f"run.output_dir={out}"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    wall = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"job {tag} failed:\n{r.stderr[-3000:]}")
    hist = [h for h in json.loads((out / "history.json").read_text()) if "tokens_per_s" in h]
    steady = hist[1:] or hist
    tps = sum(h["tokens_per_s"] * h["interval_s"] for h in steady) / sum(h["interval_s"] for h in steady)
    return {"tokens_per_s": tps, "peak_rss_mb": max(h["peak_rss_mb"] for h in hist), "wall_s": wall,
            "loss": hist[-1]["loss"], "short": short}



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random model, a few steps per variant (the tests)")
    ap.add_argument("--model", help=f"base model (default: {BASE}; with --quick a tiny one built from SNIPS)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of 32 sequences (--quick: 6 of 8) per job")
    ap.add_argument("--_breakdown", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._breakdown:  # child process
        print(json.dumps([breakdown(*variant) for variant in json.loads(args._breakdown)]))
        return 0
    steps, log_every, batch = (6, 2, 8) if args.quick else (args.steps, max(args.steps // 6, 1), 32)
    records = 256 if args.quick else 0  # quick: tokenising all 13,065 records is most of a tiny run
    from jsonextract.hardware import fast_bf16
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        model = args.model
        if not model and args.quick:
            from jsonextract.config import core as C
            from jsonextract.models.tiny import build
            model = str(build(DATA, tmp / "tiny", C.load(C.TinyModelConfig, ROOT / "configs" / "tiny" / "snips.yaml")))
        elif not model:
            from jsonextract.models.base import ensure_base
            model = str(ensure_base(ROOT / BASE))
        ov = common(model, steps, log_every, records)
        variants = {"previous": PREVIOUS, "peft layers": ["parallel.lora_kernel=peft"], "defaults": []}
        measured = in_children([ov + extra + [f"optim.batch_size={batch // 2}"] for extra in variants.values()],
                               2 if args.quick else 6, per_child=len(variants) if args.quick else 1)
        parts = dict(zip(variants, measured))
        main_ov = ov + main_job_parallel()
        rows = {"previous job (plain shuffle, SDPA, model logits, peft layers), 2 workers x 1 CPU, FSDP2":
                job(ov + PREVIOUS, 2, batch, tmp, "previous", "the previous job"),
                JOB: job(main_ov, 2, batch, tmp, "main-2", "the main job with 2 workers")}
        if not args.quick:  # what parallel.shard_frozen=false buys, beside it
            rows["the same with the frozen base sharded too (parallel.shard_frozen=true)"] = job(
                main_ov + ["parallel.shard_frozen=true"], 2, batch, tmp, "main-2-sharded", "with the base sharded")
        rows["the main job's settings, 1 worker x 2 CPUs (unsharded)"] = job(main_ov, 1, batch, tmp, "main-1",
                                                                              "with 1 worker")
        roof = roofline(model, parts["defaults"], rows, fast_bf16())  # while a --quick model exists
    lines = [f"QLoRA (NF4, LoRA r=16 on 7 projections) on {Path(model).name}, SNIPS train, {batch} sequences per "
             f"step; bf16 products faster than fp32 here (hardware.fast_bf16): {fast_bf16()}.", "",
             f"## Where a step's time goes (one process, no Ray, {batch // 2} sequences: a worker's share; seconds per step)", "",
             "| part | previous job's settings | defaults with peft's LoRA layers | defaults |", "|---|---:|---:|---:|"]
    cols = [parts["previous"], parts["peft layers"], parts["defaults"]]
    for k in ["forward", "backward", "optimizer"]:
        lines.append(f"| clock: {k} | " + " | ".join(f"{c['clock'].get(k, 0):.3f}" for c in cols) + " |")
    for k in PARTS:
        lines.append(f"| op time: {k} | " + " | ".join(f"{c['parts'].get(k, 0):.3f}" for c in cols) + " |")
    lines.append("| padding share of positions computed | " + " | ".join(f"{c['pad_share']:.1%}" for c in cols) + " |")
    lines.append("| tokens per second (one process) | " + " | ".join(f"{tps(c):.0f}" for c in cols) + " |")
    lines += ["", f"## The training job ({steps} steps; tokens/s over the steady state)", "",
              "| job | tokens/s | vs previous | last loss | peak RSS MB per worker | wall s |", "|---|---:|---:|---:|---:|---:|"]
    prev = rows[next(iter(rows))]["tokens_per_s"]
    for name, m in rows.items():
        lines.append(f"| {name} | {m['tokens_per_s']:.0f} | {m['tokens_per_s'] / prev:.2f}x | {m['loss']:.4f} | "
                     f"{m['peak_rss_mb']:.0f} | {m['wall_s']:.0f} |")
    lines += ["", roof]
    speedup = rows[JOB]["tokens_per_s"] / prev
    lines += ["", f"speedup: training job tokens/s vs the previous job on the same machine = {speedup:.2f}x"]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        results.write("train", text)
    return 0


def roofline(model: str, defaults: dict, rows: dict, bf16: bool) -> str:
    """The matrix products a training token needs, against what this machine's probe does (jsonextract.hardware):
    forward through every decoder Linear and its input gradient in backward (frozen weights: no weight gradient),
    the LoRA branches (forward, input and weight gradients), and the vocabulary head at answer tokens only."""
    from jsonextract.hardware import gflops, matmul_shapes
    shapes = matmul_shapes(model)
    head = shapes[-1][0] * shapes[-1][1]
    decoder = sum(a * b for a, b in shapes[:-1])
    lora = sum(16 * (a + b) for a, b in shapes[:-1])  # r=16 on the 7 projections of every layer
    flops = 4 * decoder + 6 * lora + 4 * head * defaults["answer_share"]
    dtype = "bfloat16" if bf16 else "float32"
    rate = gflops(model, 512, dtype)
    bound = rate * 1e9 / flops
    shares = ", ".join(f"{m['short']} {m['tokens_per_s'] / bound:.0%}" for m in rows.values())
    return (f"roofline: {flops / 1e9:.3f} GFLOP of matrix products per training token (answer tokens "
            f"{defaults['answer_share']:.0%} of all); the probe's 512-row pass in {dtype} runs at {rate:.0f} GFLOP/s "
            f"on this machine, a bound of {bound:.0f} tokens/s. Jobs at: {shares}.")


def tps(p: dict) -> float:
    return p["tokens_per_step"] / max(sum(p["clock"].values()), 1e-9)



if __name__ == "__main__":
    sys.exit(main())
