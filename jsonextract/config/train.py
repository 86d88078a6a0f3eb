"""Configuration of the training job (`jsonextract train`, rayjobs/train.py). Each setting declared once, with default and comment."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jsonextract.config.core import ConfigError, DecodingConfig, LoraSettings, ModelConfig, PromptConfig


@dataclass(frozen=True)
class TrainDataConfig:
    train_file: str = "data/snips/train.jsonl"  # JSONL of {id, text, target}
    dev_file: str = "data/snips/dev.jsonl"  # JSONL for dev loss and extraction metrics ("" = none)
    schema_file: str = ""  # JSON Schema of the targets (default: schema.json next to train_file)
    skip_bad_records: bool = False  # False: a malformed line stops the job before workers start; True: count + skip
    max_train_records: int = 0  # use only the first N good records (0 = all)
    length_group_steps: int = 32  # sort each run of N steps' examples by length and deal them out as steps in random order, so a step pads little (0 or 1 = plain shuffle)
    cache_dir: str = "artifacts/cache/tokens"  # tokenised data, keyed by file, tokenizer and prompt; one worker per node writes it ("" = no cache)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay on LoRA parameters
    betas: tuple[float, ...] = (0.9, 0.999)  # AdamW betas
    warmup_steps: int = 10  # linear warmup from 0 to lr
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    batch_size: int = 16  # sequences per micro-batch per worker
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 100  # optimizer steps in the whole run
    seed: int = 0  # data order and LoRA init
    loss: Literal["fused", "logits"] = "fused"  # fused = the vocabulary projection and cross-entropy on answer tokens only, in one pass without a logits tensor (jsonextract/loss.py); logits = the model's logits at the answer positions of any row, then cross_entropy (same value)

    def __post_init__(self) -> None:
        if self.max_steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise ConfigError("optim.max_steps, optim.batch_size and optim.grad_accum must be > 0")


@dataclass(frozen=True)
class ParallelConfig:
    # More than one worker always trains under FSDP2: fully_shard per decoder layer, then the root module.
    mixed_precision: bool = True  # FSDP2 MixedPrecisionPolicy with model.dtype params, fp32 reduce (GPU only)
    activation_checkpointing: bool = False  # recompute activations in backward to save memory
    attention: Literal["auto", "sdpa", "eager"] = "auto"  # attention kernel in training: auto = eager on CPU workers (plain matrix products: faster than SDPA's CPU kernel for short sequences, backward included), sdpa on GPUs
    lora_kernel: Literal["fused", "peft"] = "fused"  # LoRA layers over a 4-bit base in training: fused = one autograd function per projection (dequantised straight into the product's dtype, one input cast, no copy; jsonextract/training/lora_4bit.py), peft = peft's own layers (same values)
    cpu_autocast: Literal["auto", "bf16", "off"] = "auto"  # CPU workers: matmuls in bf16 under torch.autocast, fp32 weights and loss (auto = where the CPU has native bf16)
    shard_frozen: bool = True  # FSDP2 shards the decoder layers' frozen base weights too, one unit per layer (each rank holds 1/N of the base: what lets a base too big for one device train); False = every rank keeps the whole frozen base and FSDP2 wraps the root alone: the LoRA weights, their gradients and optimizer state are sharded, all-gathered once per forward


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 50  # dev loss + extraction metrics every N steps, and at the end (0 = only at the end)
    loss_examples: int = 256  # dev records for dev loss, spread over the dev file, split over workers (0 = all)
    decode_samples: int = 64  # dev records decoded (constrained) and scored with the shared metrics (0 = none)
    calibration_records: int = 256  # after training: dev records decoded to fit the confidence temperature (on the rightness of the values predicted) written to the adapter's manifest (jsonextract/temperature.py; 0 = none)


@dataclass(frozen=True)
class TrainRunConfig:
    name: str = "tiny-snips"  # run name: same name + storage_path = resume from the latest checkpoint
    storage_path: str = "runs"  # checkpoints: local folder or object-store URI (s3://...), shared by all nodes
    output_dir: str = "artifacts/adapters/tiny-snips"  # final adapter (+ tokenizer, manifest) for extract/serve
    num_workers: int = 2  # Ray Train workers (one per GPU on a GPU cluster)
    use_gpu: bool = False  # one GPU per worker, NCCL; False = CPU workers on gloo
    cpus_per_worker: float = 1.0  # CPUs reserved per worker
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # where Ray places the workers: PACK fills a node first, SPREAD puts them on different nodes where it can (STRICT_ = or wait)
    checkpoint_every_steps: int = 50  # adapter-only checkpoint every N steps (and always at the end)
    keep_checkpoints: int = 2  # checkpoints kept in storage_path (CheckpointConfig.num_to_keep)
    max_failures: int = 1  # worker-group restarts from the last checkpoint before the run fails
    log_every_steps: int = 10  # print loss, lr, tokens/s every N steps
    use_ray: bool = True  # False: run the loop in this process, world size 1, no Ray (debugging)
    fail_at_step: int = 0  # TEST ONLY: rank 0 raises once at this step on a fresh run (0 = never)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)  # used for dev-set extraction metrics
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: TrainRunConfig = field(default_factory=TrainRunConfig)
