"""The per-worker training loop. A plain function: Ray Train runs it on every worker, and it also runs in one
process without Ray (world size 1) for debugging on a single machine.

Steps: setup distributed -> load data shard -> build model (4-bit base, LoRA, FSDP2) -> restore checkpoint ->
train (answer-only loss, grad accumulation, AdamW, warmup + decay, clipping) with periodic dev evaluation and
adapter-only checkpoints -> final checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions

from .errors import UserError
from .data import Example, pad_batch, read_jsonl, spread
from .decoding import extract_in_batches
from .metrics import score_results
from .model import attach_lora, keep_4bit_layout, load_base, load_tokenizer, torch_dtype, write_manifest
from .prompt import PromptBuilder
from .schema import load_schema
from .train_config import TrainConfig
from .config import to_dict

# Whole tensors of the trainable (LoRA) parameters only, gathered to rank 0 on the CPU.
FULL_LORA_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)

TRAINER_STATE = "trainer_state.pt"  # step, optimizer and scheduler state; the LoRA weights are the PEFT file
HISTORY = "history.json"


# ---------------------------------------------------------------------------------------------- data


def schema_path(cfg: TrainConfig) -> Path:
    return Path(cfg.data.schema_file) if cfg.data.schema_file else Path(cfg.data.train_file).with_name("schema.json")


def check_records(path: str, skip_bad: bool, limit: int = 0) -> tuple[list, int]:
    """(good records, number skipped). A bad record raises with file and line unless skip_bad."""
    good, skipped = [], 0
    for rec in read_jsonl(path, need_target=True):
        if rec.ok:
            good.append(rec)
            if limit and len(good) >= limit:
                break
        elif skip_bad:
            skipped += 1
        else:
            raise UserError(f"bad training record: {rec.error} (set data.skip_bad_records=true to skip such lines)")
    if not good:
        raise UserError(f"{path}: no usable records")
    return good, skipped


def tokenize(records: list, prompt: PromptBuilder, tokenizer: Any, max_length: int) -> tuple[list[Example], int]:
    """Examples with answer-only labels; records longer than max_length are dropped and counted (never silently)."""
    out, too_long = [], 0
    for r in records:
        ex = prompt.encode_example(tokenizer, r.text, r.target, max_length)
        if ex is None:
            too_long += 1
        else:
            out.append(ex)
    return out, too_long


def micro_batches(examples: list[Example], step: int, cfg: TrainConfig, rank: int, world: int) -> list[list[Example]]:
    """The micro-batches rank `rank` trains on at optimizer step `step` (0-based).

    The order is a deterministic function of (seed, epoch), so a resumed run continues at exactly the data
    position it stopped at: no state beyond the step count is needed.
    """
    per_step = cfg.optim.batch_size * cfg.optim.grad_accum * world
    per_epoch = max(len(examples) // per_step, 1)
    epoch, k = divmod(step, per_epoch)
    order = list(range(len(examples)))
    random.Random(cfg.optim.seed * 100003 + epoch).shuffle(order)
    chunk = [examples[i % len(examples)] for i in order[k * per_step:(k + 1) * per_step]]
    mine = chunk[rank::world]
    # Group similar lengths into the same micro-batch: less padding, same examples per step.
    mine.sort(key=len)
    b = cfg.optim.batch_size
    return [mine[i:i + b] for i in range(0, len(mine), b)]


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


# ---------------------------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    ray: bool

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> Dist:
    try:
        import ray.train
        ctx = ray.train.get_context()
        in_ray = ctx.get_world_size() >= 1 and dist.is_initialized()
    except Exception:
        in_ray = False
    if in_ray:
        import ray.train.torch
        device = ray.train.torch.get_device()
        return Dist(ctx.get_world_rank(), ctx.get_world_size(), device, True)
    if not dist.is_initialized():  # one process, world size 1: FSDP2 still needs a process group
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        use_cuda = cfg.run.use_gpu and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=0, world_size=1)
    device = torch.device("cuda", 0) if cfg.run.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    return Dist(0, 1, device, False)


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------- model


def build_model(cfg: TrainConfig, d: Dist):
    torch.manual_seed(cfg.optim.seed)
    model = attach_lora(load_base(cfg.model, str(d.device)), cfg.lora)
    keep_4bit_layout(model)  # dev loss runs this model in eval mode: no in-place repacking (see its note)
    if cfg.parallel.activation_checkpointing:
        # Reentrant checkpointing: bitsandbytes 4-bit layers run custom autograd functions whose saved tensors do
        # not survive non-reentrant recomputation under FSDP; reentrant needs inputs that require grad, hence
        # enable_input_require_grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    if cfg.parallel.strategy == "fsdp2" and d.world > 1:
        # With one rank FSDP shards nothing but still pays DTensor and all-gather bookkeeping on every op
        # (measured: 1-worker job at 0.6x a plain loop's tokens/s), so a world of one trains unwrapped.
        shard_fsdp2(model, cfg, d)
    elif cfg.parallel.strategy == "ddp" and d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model


def decoder_layers(model) -> list[torch.nn.Module]:
    for m in model.modules():
        layers = getattr(m, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attn"):
            return list(layers)
    raise RuntimeError("could not find the decoder layers to shard (expected a `.layers` ModuleList)")


def shard_fsdp2(model, cfg: TrainConfig, d: Dist) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {}
    if d.device.type == "cuda" and cfg.parallel.mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch_dtype(cfg.model.dtype), reduce_dtype=torch.float32)
    if cfg.parallel.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def lora_state(model) -> dict[str, torch.Tensor]:
    """Whole (unsharded) LoRA weights by their plain names, on rank 0 (empty elsewhere); a collective: every rank
    must call it. torch's own state-dict helper handles FSDP2 DTensors, DDP and unwrapped models alike."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    names = {n for n, _ in trainable(unwrap(model))}
    # ignore_frozen_params drops frozen parameters but not the 4-bit layers' quantisation-state entries
    return {k: v for k, v in get_model_state_dict(model, options=FULL_LORA_STATE).items() if k in names}


# ---------------------------------------------------------------------------------------------- checkpoints


def local_checkpoints(root: Path) -> list[Path]:
    """Checkpoints written by a run without Ray (checkpoint_<step>), oldest first."""
    return sorted((p for p in root.glob("checkpoint_*") if p.is_dir() and p.name.split("_")[1].isdigit()),
                  key=lambda p: int(p.name.split("_")[1]))


class Reporter:
    """Checkpoint/metrics sink: Ray Train's report in a Ray worker, a local folder otherwise."""

    def __init__(self, cfg: TrainConfig, d: Dist):
        self.cfg, self.d = cfg, d
        self.local_root = Path(cfg.run.storage_path) / cfg.run.name

    def latest(self) -> Path | None:
        if self.d.ray:
            import ray.train
            ck = ray.train.get_checkpoint()
            if ck is None:
                return None
            tmp = Path(tempfile.mkdtemp(prefix="resume-"))
            return Path(ck.to_directory(str(tmp)))
        cks = local_checkpoints(self.local_root)
        return cks[-1] if cks else None

    def report(self, metrics: dict, ckpt_dir: Path | None, step: int) -> None:
        if self.d.ray:
            import ray.train
            ck = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
            ray.train.report(metrics, checkpoint=ck)
        elif ckpt_dir is not None:
            import shutil
            dest = self.local_root / f"checkpoint_{step:06d}"
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(ckpt_dir, dest)
            for old in local_checkpoints(self.local_root)[:-self.cfg.run.keep_checkpoints]:
                shutil.rmtree(old)


@dataclass
class State:
    step: int = 0
    history: list[dict] = field(default_factory=list)  # one entry per logged step / evaluation


def save_checkpoint(model, optimizer, scheduler, state: State, cfg: TrainConfig, d: Dist, tokenizer, schema,
                    metrics: dict) -> Path | None:
    """Adapter-only checkpoint (PEFT files + tokenizer + manifest + trainer state); written by rank 0.
    Every rank must call it: gathering the sharded LoRA weights and optimizer state is a collective."""
    from peft import get_peft_model_state_dict
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    weights = lora_state(model)
    optim_state = get_optimizer_state_dict(model, optimizer, options=FULL_LORA_STATE)
    if not d.main:
        return None
    out = Path(tempfile.mkdtemp(prefix=f"ckpt-{state.step}-"))
    peft_model = unwrap(model)
    peft_model.save_pretrained(str(out), state_dict=get_peft_model_state_dict(peft_model, state_dict=weights))
    tokenizer.save_pretrained(str(out))
    write_manifest(out, base_model=cfg.model.name, prompt=cfg.prompt, schema=schema, config=to_dict(cfg),
                   metrics=metrics, step=state.step)
    torch.save({"step": state.step, "optimizer": optim_state, "scheduler": scheduler.state_dict()},
               out / TRAINER_STATE)
    (out / HISTORY).write_text(json.dumps(state.history))
    return out


def restore_checkpoint(path: Path, model, optimizer, scheduler, state: State) -> None:
    """Every rank reads the same checkpoint; torch's state-dict helpers shard the weights and optimizer state."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    ts = torch.load(path / TRAINER_STATE, weights_only=False)
    saved = load_file(str(path / "adapter_model.safetensors"))
    # The PEFT file leaves out the adapter name: `...q_proj.lora_A.weight` is `...q_proj.lora_A.default.weight`.
    weights = {k.replace(".weight", ".default.weight") if ".lora_" in k else k: v for k, v in saved.items()}
    missing = sorted({n for n, _ in trainable(unwrap(model))} - set(weights))
    if missing:
        raise RuntimeError(f"checkpoint {path} has no weights for {missing[0]} (and {len(missing) - 1} more): "
                           "was it written with another LoRA config?")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, optimizer, ts["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(ts["scheduler"])
    state.step = ts["step"]
    if (path / HISTORY).is_file():
        state.history = json.loads((path / HISTORY).read_text())


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------- evaluation


def dev_examples(dev: list[Example], cfg) -> list[Example]:
    """The fixed dev-loss set: `eval.loss_examples` records spread over the dev file, the same at every evaluation
    and for any number of workers, so a reported dev loss can be recomputed from the adapter alone."""
    return spread(dev, cfg.loss_examples)


def mean_loss(model, examples: list[Example], batch_size: int, pad_id: int, d: Dist | None = None) -> float:
    """Answer-token-weighted mean loss over `examples`, in micro-batches of `batch_size` dealt round-robin to the
    ranks of `d`. Under FSDP every rank must run the same number of forward passes (each is a collective), so a
    rank without a batch of its own in the last round repeats one with weight 0."""
    rank, world = (d.rank, d.world) if d else (0, 1)
    device = d.device if d else next(model.parameters()).device
    batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    rounds = -(-len(batches) // world)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for k in range(rounds):
            i = k * world + rank
            b = {n: v.to(device) for n, v in pad_batch(batches[min(i, len(batches) - 1)], pad_id).items()}
            tokens = float((b["labels"][:, 1:] != -100).sum()) if i < len(batches) else 0.0
            total += float(model(**b).loss) * tokens
            count += tokens
    model.train(was_training)
    if d is not None and world > 1:
        total, count = all_reduce_sum([total, count], d)
    return total / max(count, 1.0)


class DevDecoder:
    """Rank 0 keeps an unsharded copy of the model (same base, same LoRA config) for constrained decoding on a
    dev sample: generate() under FSDP would need every rank to run the same number of forward passes."""

    def __init__(self, cfg: TrainConfig, d: Dist, tokenizer, prompt: PromptBuilder, records: list):
        n = cfg.eval.decode_samples
        self.records = spread(records, n) if n else []
        self.cfg, self.d = cfg, d
        self.model = None
        if d.main and self.records:
            from .decoding import Extractor
            self.model = attach_lora(load_base(cfg.model, str(d.device)), cfg.lora)
            self.extractor = Extractor(self.model, tokenizer, prompt, cfg.decoding,
                                       max_prompt_tokens=cfg.model.max_length - cfg.decoding.max_new_tokens)

    def __call__(self, weights: dict[str, torch.Tensor]) -> dict:
        if self.model is None:
            return {}
        unexpected = self.model.load_state_dict(weights, strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"dev decoder: no parameter {unexpected[0]} in its model copy")
        self.model.eval()
        results = extract_in_batches(self.extractor, [r.text for r in self.records], self.cfg.decoding.batch_size)
        self.model.train()
        m = score_results(zip(results, [r.target for r in self.records]))
        out = {"dev_f1": m["f1"], "dev_exact_match": m["exact_match"], "dev_schema_valid": m["schema_valid_rate"]}
        for g, gm in m["groups"].items():
            out[f"dev_{g}_f1"] = gm["f1"]
        return out


# ---------------------------------------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict) -> None:
    cfg: TrainConfig = config["cfg"]
    d = setup_distributed(cfg)
    log = say if d.main else (lambda msg: None)

    # -- data
    tokenizer = load_tokenizer(cfg.model.name)
    schema = load_schema(schema_path(cfg))
    prompt = PromptBuilder(cfg.prompt, schema)
    records, skipped = check_records(cfg.data.train_file, cfg.data.skip_bad_records, cfg.data.max_train_records)
    train, too_long = tokenize(records, prompt, tokenizer, cfg.model.max_length)
    dev_records = check_records(cfg.data.dev_file, True)[0] if cfg.data.dev_file else []
    dev = tokenize(dev_records, prompt, tokenizer, cfg.model.max_length)[0]
    log(f"{len(train)} training examples ({skipped} bad lines skipped, {too_long} longer than "
        f"model.max_length={cfg.model.max_length} dropped), {len(dev)} dev; world size {d.world} on {d.device}")

    # -- model, optimizer, schedule
    model = build_model(cfg, d)
    params = [p for _, p in trainable(model)]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=tuple(cfg.optim.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    decoder = DevDecoder(cfg, d, tokenizer, prompt, dev_records)
    reporter = Reporter(cfg, d)
    state = State()

    # -- resume
    latest = reporter.latest()
    fresh = latest is None
    if latest is not None:
        restore_checkpoint(latest, model, optimizer, scheduler, state)
        state.history.append({"event": "resume", "step": state.step})
        log(f"resumed from {latest} at step {state.step}")
        if state.step >= cfg.optim.max_steps:  # finished before: hand back its final checkpoint, train nothing
            log(f"run already complete at step {state.step} (optim.max_steps={cfg.optim.max_steps})")
            metrics = json.loads((latest / "manifest.json").read_text()).get("metrics", {}) if d.main else {}
            reporter.report(metrics or {"step": state.step}, latest if d.main else None, state.step)

    # -- train
    pad = tokenizer.pad_token_id
    model.train()
    t_last, tokens_since = time.time(), 0.0
    while state.step < cfg.optim.max_steps:
        if cfg.run.fail_at_step and fresh and state.step == cfg.run.fail_at_step and d.main:
            raise RuntimeError(f"injected failure at step {state.step} (run.fail_at_step, test only)")
        loss_sum, answer_tok, tok = train_step(model, optimizer, scheduler, params, cfg, d, train, state.step, pad)
        state.step += 1
        tokens_since += tok
        if state.step % cfg.run.log_every_steps == 0 or state.step == cfg.optim.max_steps:
            loss, answer_tokens = all_reduce_sum([loss_sum, answer_tok], d)
            loss /= max(answer_tokens, 1.0)
            tps = all_reduce_sum([tokens_since], d)[0] / max(time.time() - t_last, 1e-9)
            entry = {"step": state.step, "loss": loss, "lr": scheduler.get_last_lr()[0], "tokens_per_s": tps,
                     "interval_s": time.time() - t_last, "peak_rss_mb": peak_rss_mb()}
            state.history.append(entry)
            log(f"step {state.step}/{cfg.optim.max_steps} loss {loss:.4f} lr {entry['lr']:.2e} tokens/s {tps:.0f}")
            t_last, tokens_since = time.time(), 0.0
        if maybe_evaluate_and_checkpoint(model, optimizer, scheduler, state, cfg, d, tokenizer, schema, dev,
                                         decoder, reporter, pad, log):
            t_last = time.time()  # tokens/s measures training only, not evaluation or checkpointing
    dist.barrier()
    if not d.ray:
        dist.destroy_process_group()


def answer_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token loss on answer tokens, with logits computed only where some row has an answer token.

    The prompt is most of each sequence and the vocabulary projection is the largest matmul of a small model
    (SmolLM2-135M: a 49,152 x 576 tied lm_head, 28M of 135M parameters), so materialising fp32 logits for every
    position cost ~15% of a training step on CPU for positions whose labels are -100. `logits_to_keep` goes
    through the model's own forward (under FSDP2 the root module's hooks must run), and takes one set of
    positions for the whole batch: the union over rows."""
    labels = batch["labels"][:, 1:]  # position p predicts token p + 1
    keep = (labels != -100).any(0).nonzero().squeeze(1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels[:, keep].flatten(), ignore_index=-100)


def autocast(cfg: TrainConfig, d: Dist):
    """bf16 autocast for CPU training where the CPU computes bf16 natively (2-2.5x fp32 matmul throughput
    measured on AVX512-BF16); elsewhere a no-op, since emulated bf16 is slower than fp32. GPUs use FSDP2's
    MixedPrecisionPolicy instead."""
    import contextlib
    mode = cfg.parallel.cpu_autocast
    if d.device.type != "cpu" or mode == "off" or (mode == "auto" and not cpu_has_native_bf16()):
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def cpu_has_native_bf16() -> bool:
    # Not torch.ops.mkldnn._is_mkldnn_bf16_supported(): it is true on any AVX512-BW CPU, where oneDNN emulates bf16.
    from bitsandbytes.functional import has_avx512bf16
    return bool(has_avx512bf16())


def train_step(model, optimizer, scheduler, params, cfg: TrainConfig, d: Dist, train: list[Example], step: int,
               pad: int) -> tuple[float, float, float]:
    """One optimizer step over grad_accum micro-batches.
    Returns (answer-token-weighted loss sum, answer tokens, all non-pad tokens processed)."""
    batches = micro_batches(train, step, cfg, d.rank, d.world)
    loss_sum, answer_tokens, tokens = 0.0, 0.0, 0.0
    for i, mb in enumerate(batches):
        b = {k: v.to(d.device) for k, v in pad_batch(mb, pad).items()}
        last = i == len(batches) - 1
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter gradients only once per step
            model.set_requires_gradient_sync(last)
        with autocast(cfg, d):
            loss = answer_loss(model, b)
        (loss / len(batches)).backward()
        n = float((b["labels"] != -100).sum())
        loss_sum += float(loss.detach()) * n
        answer_tokens += n
        tokens += float(b["attention_mask"].sum())
    if cfg.optim.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        if hasattr(norm, "full_tensor"):
            norm.full_tensor()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, answer_tokens, tokens


def maybe_evaluate_and_checkpoint(model, optimizer, scheduler, state: State, cfg: TrainConfig, d: Dist, tokenizer,
                                  schema, dev, decoder, reporter: Reporter, pad: int, log) -> bool:
    end = state.step == cfg.optim.max_steps
    do_eval = end or (cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0)
    do_ckpt = end or (cfg.run.checkpoint_every_steps and state.step % cfg.run.checkpoint_every_steps == 0)
    if not (do_eval or do_ckpt):
        return False
    metrics: dict[str, Any] = {"step": state.step}
    if state.history:
        metrics["train_loss"] = state.history[-1]["loss"]
    if do_eval and dev:
        metrics["dev_loss"] = mean_loss(model, dev_examples(dev, cfg.eval), cfg.optim.batch_size, pad, d)
        weights = lora_state(model)  # collective
        metrics.update(decoder(weights))
        state.history.append({k: v for k, v in metrics.items() if k != "train_loss"})
        log("eval " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    ckpt = save_checkpoint(model, optimizer, scheduler, state, cfg, d, tokenizer, schema, metrics) if do_ckpt else None
    reporter.report(metrics, ckpt, state.step)
    return True


def say(msg: str) -> None:
    """Progress line from rank 0. Not print(): Ray Train v2 patches print on workers to go to its logger *and*,
    because Ray has wrapped sys.stdout, to the original print as well, so every line reached the driver twice."""
    sys.stdout.write(f"[train rank0] {msg}\n")
    sys.stdout.flush()


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
