"""The training recipe: what every Ray Train worker runs (and one process without Ray, world size 1, for
debugging). It reads top to bottom as its steps:

    setup (data, model: 4-bit base + LoRA + FSDP2, optimizer, schedule) -> resume from the latest checkpoint ->
    train (answer-only loss, grad accumulation, AdamW, warmup + decay, clipping), with periodic dev evaluation
    and adapter-only checkpoints -> final checkpoint.

The other concerns live in their own modules: train_data (records, tokens, micro-batches), distributed (ranks,
FSDP2), checkpoint (save/restore), evaluation (dev loss, dev extraction).
"""
from __future__ import annotations

import contextlib
import json
import math
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from jsonextract import hardware
from jsonextract.config.core import to_dict
from jsonextract.config.train import TrainConfig
from jsonextract.data.prompt import PromptBuilder
from jsonextract.data.records import pad_batch
from jsonextract.data.schema import load_schema
from jsonextract.lazy import lazy
from jsonextract.logs import clock, quiet_train_worker
from jsonextract.models.loading import attach_lora, keep_4bit_layout, load_base, load_tokenizer
from jsonextract.models.manifest import write_manifest
from jsonextract.training.batches import check_records, load_tokenized, micro_batches, schema_path
from jsonextract.training.checkpoint import (
    CheckpointStore,
    TrainState,
    lora_state,
    restore_checkpoint,
    save_checkpoint,
    trainable,
)
from jsonextract.training.dev_eval import DevDecoder, dev_examples, mean_loss
from jsonextract.training.distributed import Worker, all_reduce_sum, setup_distributed, shard_fsdp2
from jsonextract.training.loss import answer_loss

lora_4bit = lazy("jsonextract.training.lora_4bit")  # imports peft and bitsandbytes: only where a model is built


def train_loop_per_worker(config: dict) -> None:
    quiet_train_worker()
    recipe = Recipe(config["cfg"])
    recipe.setup()
    recipe.resume()
    recipe.train()
    recipe.close()


@dataclass(frozen=True)
class StepStats:
    loss_sum: float  # answer-token-weighted loss, summed over this worker's micro-batches
    answer_tokens: float
    tokens: float  # all non-pad tokens processed (prompt + answer)


class Recipe:
    """One worker's training run; its state lives here, not in the arguments of a dozen functions."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.worker: Worker = setup_distributed(cfg)
        self.state = TrainState()
        self.fresh = True  # no checkpoint was restored (run.fail_at_step fires only then)

    def log(self, msg: str) -> None:
        """Progress line from rank 0. Not print(): Ray Train v2 patches print on workers to go to its logger
        *and*, because Ray has wrapped sys.stdout, to the original print as well: every line came twice."""
        if self.worker.main:
            sys.stdout.write(f"[train rank0] {msg}\n")
            sys.stdout.flush()

    # ------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        cfg, worker = self.cfg, self.worker
        self.tokenizer = load_tokenizer(cfg.model.name)
        self.pad_id = self.tokenizer.pad_token_id
        self.schema = load_schema(schema_path(cfg))
        prompt = PromptBuilder(cfg.prompt, self.schema)
        self.train_data = self._tokenized(cfg.data.train_file, prompt, cfg.data.skip_bad_records,
                                          cfg.data.max_train_records)
        dev_records = check_records(cfg.data.dev_file, True)[0] if cfg.data.dev_file else []
        self.dev = self._tokenized(cfg.data.dev_file, prompt, True, 0).examples if cfg.data.dev_file else []
        self.placement = self._placement()
        nodes = len({w["node"] for w in self.placement})
        self.log(f"{len(self.train_data.examples)} training examples ({self.train_data.skipped} bad lines skipped, "
                 f"{self.train_data.too_long} longer than model.max_length={cfg.model.max_length} dropped), "
                 f"{len(self.dev)} dev; world size {worker.world} on {worker.device}"
                 + (f", {nodes} nodes" if nodes > 1 else ""))

        self.bf16 = agree_on_autocast(cfg, worker)
        self.model = self._build_model()
        self.params = [p for _, p in trainable(self.model)]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                           betas=tuple(cfg.optim.betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.decoder = DevDecoder(cfg, worker, self.tokenizer, prompt, dev_records)
        self.store = CheckpointStore(cfg, worker)

    def _tokenized(self, path: str, prompt: PromptBuilder, skip_bad: bool, limit: int):
        """Node-local rank 0 tokenises (or finds the cache); the others wait, then read its cache."""
        args = (path, prompt, self.tokenizer, self.cfg.model.max_length, skip_bad, limit, self.cfg.data.cache_dir)
        first = load_tokenized(*args, builder=True) if self.worker.node_main else None
        dist.barrier()
        return first if first is not None else load_tokenized(*args, builder=False)

    def _placement(self) -> list[dict]:
        """Each rank's node and whether it tokenised the training file itself (at most one worker per node builds
        the token cache); kept in the run's history, so where a run's workers ran can be checked afterwards."""
        mine = {"rank": self.worker.rank, "node": self.worker.node, "tokenised": self.train_data.built}
        everyone: list = [None] * self.worker.world
        dist.all_gather_object(everyone, mine)
        return everyone

    def _build_model(self):
        torch.manual_seed(self.cfg.optim.seed)
        return build_model(self.cfg, self.worker)

    # ------------------------------------------------------------------------------------------ resume

    def resume(self) -> None:
        found = self.store.latest()
        if found is None:
            return
        latest, stored = found
        self.fresh = False
        try:
            restore_checkpoint(latest, self.model, self.optimizer, self.scheduler, self.state)
            self.state.history.append({"event": "resume", "step": self.state.step})
            self.log(f"resumed from {stored} at step {self.state.step}")
            if self.state.step >= self.cfg.optim.max_steps:  # finished before: hand back its final checkpoint
                self.log(f"run already complete at step {self.state.step} "
                         f"(optim.max_steps={self.cfg.optim.max_steps})")
                main = self.worker.main
                metrics = json.loads((latest / "manifest.json").read_text()).get("metrics", {}) if main else {}
                self.store.report(metrics or {"step": self.state.step}, latest if main else None, self.state.step)
        finally:
            if self.worker.in_ray:  # a temporary copy of the stored checkpoint
                shutil.rmtree(latest, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ train

    def train(self) -> None:
        cfg, state = self.cfg, self.state
        state.history.append({"event": "workers", "step": state.step, "workers": self.placement})
        self.model.train()
        t_last, tokens_since, step_last = time.time(), 0.0, state.step
        while state.step < cfg.optim.max_steps:
            if cfg.run.fail_at_step and self.fresh and state.step == cfg.run.fail_at_step and self.worker.main:
                raise RuntimeError(f"injected failure at step {state.step} (run.fail_at_step, test only)")
            stats = self.step()
            state.step += 1
            tokens_since += stats.tokens
            if state.step % cfg.run.log_every_steps == 0 or state.step == cfg.optim.max_steps:
                self._log_progress(stats, tokens_since, time.time() - t_last, state.step - step_last)
                t_last, tokens_since, step_last = time.time(), 0.0, state.step
            if self.evaluate_and_checkpoint():
                t_last = time.time()  # tokens/s measures training only, not evaluation or checkpointing

    def step(self) -> StepStats:
        """One optimizer step over grad_accum micro-batches."""
        worker = self.worker
        batches = micro_batches(self.train_data.examples, self.state.step, self.cfg, worker.rank, worker.world)
        loss_sum, answer_tokens, tokens = 0.0, 0.0, 0.0
        for i, mb in enumerate(batches):
            b = {k: v.to(worker.device) for k, v in pad_batch(mb, self.pad_id).items()}
            if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter once per step
                self.model.set_requires_gradient_sync(i == len(batches) - 1)
            with autocast(self.bf16):
                loss = answer_loss(self.model, b, fused=self.cfg.optim.loss == "fused")
            (loss / len(batches)).backward()
            n = float((b["labels"] != -100).sum())
            loss_sum += float(loss.detach()) * n
            answer_tokens += n
            tokens += float(b["attention_mask"].sum())
        if self.cfg.optim.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
            if hasattr(norm, "full_tensor"):
                norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(loss_sum, answer_tokens, tokens)

    def _log_progress(self, stats: StepStats, tokens_since: float, seconds: float, steps: int) -> None:
        loss, answer_tokens = all_reduce_sum([stats.loss_sum, stats.answer_tokens], self.worker)
        loss /= max(answer_tokens, 1.0)
        tps = all_reduce_sum([tokens_since], self.worker)[0] / max(seconds, 1e-9)
        entry = {"step": self.state.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tps,
                 "interval_s": seconds, "peak_rss_mb": peak_rss_mb()}
        self.state.history.append(entry)
        eta = (self.cfg.optim.max_steps - self.state.step) * seconds / max(steps, 1)  # training steps only
        self.log(f"step {self.state.step}/{self.cfg.optim.max_steps} loss {loss:.4f} lr {entry['lr']:.2e} "
                 f"tokens/s {tps:.0f} ETA {clock(eta)}")

    # ------------------------------------------------------------------------------------------ evaluate, save

    def evaluate_and_checkpoint(self) -> bool:
        cfg, state = self.cfg, self.state
        end = state.step == cfg.optim.max_steps
        do_eval = end or (cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0)
        do_ckpt = end or (cfg.run.checkpoint_every_steps and state.step % cfg.run.checkpoint_every_steps == 0)
        if not (do_eval or do_ckpt):
            return False
        metrics: dict[str, Any] = {"step": state.step}
        losses = [h["loss"] for h in state.history if "loss" in h]  # not the resume or eval entries
        if losses:
            metrics["train_loss"] = losses[-1]
        if do_eval and self.dev:
            metrics["dev_loss"] = mean_loss(self.model, dev_examples(self.dev, cfg.eval), cfg.optim.batch_size,
                                            self.pad_id, self.worker)
            metrics.update(self.decoder(lora_state(self.model)))  # lora_state is a collective
            state.history.append({k: v for k, v in metrics.items() if k != "train_loss"})
            self.log("eval " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in metrics.items()))
        ckpt = save_checkpoint(self.model, self.optimizer, self.scheduler, state, self.worker) if do_ckpt else None
        if ckpt is not None:
            self.tokenizer.save_pretrained(str(ckpt))
            write_manifest(ckpt, base_model=cfg.model.name, prompt=cfg.prompt, schema=self.schema,
                           config=to_dict(cfg), metrics=metrics, step=state.step)
        self.store.report(metrics, ckpt, state.step)
        return True

    def close(self) -> None:
        dist.barrier()
        if not self.worker.in_ray:
            dist.destroy_process_group()


def build_model(cfg: TrainConfig, worker: Worker):
    """The model a worker trains: the (4-bit) base with the training attention, a fresh LoRA (fused over a 4-bit
    base unless parallel.lora_kernel=peft), activation checkpointing if asked, FSDP2 when there are several ranks."""
    base = load_base(cfg.model, str(worker.device))
    base.set_attn_implementation(train_attention(cfg, worker))
    model = attach_lora(base, cfg.lora)
    if cfg.parallel.lora_kernel == "fused":
        lora_4bit.fuse_lora_4bit(model)
    keep_4bit_layout(model)  # dev loss runs this model in eval mode: no in-place repacking (see its note)
    if cfg.parallel.activation_checkpointing:
        # Reentrant checkpointing: bitsandbytes 4-bit layers run custom autograd functions whose saved tensors
        # do not survive non-reentrant recomputation under FSDP; reentrant needs inputs that require grad,
        # hence enable_input_require_grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    if worker.world > 1:
        # With one rank FSDP shards nothing but still pays DTensor and all-gather bookkeeping on every op
        # for nothing, so a world of one trains unwrapped.
        shard_fsdp2(model, cfg, worker)
    return model


def train_attention(cfg: TrainConfig, worker: Worker) -> str:
    """The attention implementation training runs: `auto` is eager on CPU workers. There, for sequences of a
    few hundred tokens, eager's batched matrix products beat torch's CPU flash-attention kernel, whose backward
    walks small blocks one at a time (docs/experiments.md has the measurement); GPUs keep SDPA's kernels."""
    choice = cfg.parallel.attention
    if choice == "auto":
        return "eager" if worker.device.type == "cpu" else "sdpa"
    return choice


def agree_on_autocast(cfg: TrainConfig, worker: Worker) -> bool:
    """Whether CPU workers multiply in bf16 under torch.autocast: where bf16 products are measured faster than fp32
    (hardware.fast_bf16, the rule inference follows too), or as set; elsewhere not, since emulated bf16 is slower
    than fp32. Every rank probes its own CPU and all take bf16 only if all would: the ranks of one model must
    compute alike, and the probe of one rank can differ from another's (other CPUs, or load during the probe).
    GPUs use FSDP2's MixedPrecisionPolicy instead."""
    mode = cfg.parallel.cpu_autocast
    mine = worker.device.type == "cpu" and (mode == "bf16" or (mode == "auto" and hardware.fast_bf16()))
    return all_reduce_sum([float(not mine)], worker)[0] == 0 if worker.world > 1 else mine


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def lr_lambda(cfg: TrainConfig):
    o = cfg.optim

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min((step - o.warmup_steps) / max(o.max_steps - o.warmup_steps, 1), 1.0)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * decay
    return f


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
