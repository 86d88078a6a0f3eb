"""Quality per training step: QLoRA (what the main job trains) against LoRA on an unquantised base and against
full-weight fine-tuning, on the same fresh tiny model, SNIPS data, batches and schedule, in one process. Prints
dev loss and constrained-decoding dev metrics side by side. This is the experiment behind the README's
"what limits the main job" notes.

    .venv/bin/python bench/adapt.py                         # 400 steps each, 150 dev records (~25 min here)
    .venv/bin/python bench/adapt.py --steps 200 --modes qlora,full
    .venv/bin/python bench/adapt.py --quick                 # a few steps (what the test suite runs)

LoRA settings are the main job's (`configs/train/snips_cpu.yaml`: r=64 on every projection and lm_head); peak
learning rates: 2e-3 for adapters (that config), 1e-3 for full weights.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import results

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "snips"
MAIN_CONFIG = ROOT / "configs" / "train" / "snips_cpu.yaml"
PEAK_LR = {"qlora": 2e-3, "lora": 2e-3, "full": 1e-3}


def load_model(mode: str, model_dir: str, cfg):
    from dataclasses import replace

    from jsonextract.models.loading import attach_lora, load_base

    quant = "nf4" if mode == "qlora" else "none"
    base = load_base(replace(cfg.model, name=model_dir, quantization=quant))
    return base if mode == "full" else attach_lora(base, cfg.lora)


def run(mode: str, model_dir: str, steps: int, dev_n: int) -> dict:
    import torch
    from dataclasses import replace

    from jsonextract.config import core as C
    from jsonextract.data.records import pad_batch, spread
    from jsonextract.decoding.extractor import Extractor, extract_in_batches
    from jsonextract.evaluation.metrics import score_results
    from jsonextract.models.loading import load_tokenizer
    from jsonextract.data.prompt import PromptBuilder
    from jsonextract.data.schema import load_schema
    from jsonextract.config.train import TrainConfig
    from jsonextract.training.dev_eval import mean_loss
    from jsonextract.training.batches import check_records, micro_batches, tokenize
    from jsonextract.training.recipe import lr_lambda

    cfg = C.load(TrainConfig, MAIN_CONFIG, [])
    cfg = replace(cfg, optim=replace(cfg.optim, lr=PEAK_LR[mode], max_steps=steps, batch_size=32,
                                     warmup_steps=min(cfg.optim.warmup_steps, max(steps // 10, 1))))
    tok = load_tokenizer(model_dir)
    prompt = PromptBuilder(cfg.prompt, load_schema(DATA / "schema.json"))
    train, _ = tokenize(check_records(str(DATA / "train.jsonl"), False)[0], prompt, tok, cfg.model.max_length)
    dev_records = check_records(str(DATA / "dev.jsonl"), False)[0]
    dev_records = spread(dev_records, dev_n)
    torch.manual_seed(0)
    model = load_model(mode, model_dir, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    t0, tokens = time.time(), 0.0
    for step in range(steps):
        for mb in micro_batches(train, step, cfg, 0, 1):
            b = pad_batch(mb, tok.pad_token_id)
            model(**b).loss.backward()
            tokens += float(b["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.time() - t0
    dev_loss = mean_loss(model, tokenize(dev_records, prompt, tok, cfg.model.max_length)[0], 32, tok.pad_token_id)
    model.eval()
    results = extract_in_batches(Extractor(model, tok, prompt, cfg.decoding), [r.text for r in dev_records],
                                 cfg.decoding.batch_size)
    m = score_results(zip(results, [r.target for r in dev_records]))
    return {"trainable": sum(p.numel() for p in params), "tokens_per_s": tokens / train_s,
            "dev_loss": dev_loss, "schema_valid": m["schema_valid_rate"],
            "intent": m["groups"]["intent"]["recall"], "slots_f1": m["groups"]["slots"]["f1"], "f1": m["f1"]}


def measure() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5 steps, 16 dev records (used by the tests)")
    ap.add_argument("--steps", type=int, default=400, help="optimizer steps of 32 sequences per mode")
    ap.add_argument("--dev", type=int, default=150, help="dev records decoded and scored")
    ap.add_argument("--modes", default="qlora,lora,full", help="comma-separated: qlora, lora, full")
    ap.add_argument("--model", help="base model dir (default: build a fresh tiny one from SNIPS)")
    args = ap.parse_args()
    steps, dev_n = (5, 16) if args.quick else (args.steps, args.dev)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in PEAK_LR]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {sorted(PEAK_LR)}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if not model_dir:
            from jsonextract.config import core as C
            from jsonextract.models.tiny import build
            model_dir = str(build(DATA, Path(tmp) / "tiny", C.load(C.TinyModelConfig, ROOT / "configs/tiny/snips.yaml")))
        rows = {m: run(m, model_dir, steps, dev_n) for m in modes}
    print(f"\nTiny model from scratch on SNIPS: {steps} steps of 32 sequences per mode, dev metrics on {dev_n} records\n")
    print("| mode | trainable params | tokens/s | dev loss | schema-valid | intent acc | slot F1 | field F1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['trainable'] / 1e6:.2f}M | {r['tokens_per_s']:.0f} | {r['dev_loss']:.3f} | "
              f"{r['schema_valid']:.0%} | {r['intent']:.1%} | {r['slots_f1']:.3f} | {r['f1']:.3f} |")
    if "qlora" in rows and "full" in rows:
        print(f"\nQLoRA / full-weight dev loss: {rows['qlora']['dev_loss'] / rows['full']['dev_loss']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(results.main("adapt", measure))
