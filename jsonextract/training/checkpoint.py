"""Adapter-only training checkpoints: PEFT files + tokenizer + manifest + trainer state, written by rank 0 and
stored through Ray Train (or a local folder when run without Ray). FSDP2 shards go through torch's own
state-dict helpers, which gather and scatter DTensors for sharded and unwrapped models alike."""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from jsonextract.config.train import TrainConfig
from jsonextract.lazy import lazy
from jsonextract.training.distributed import Worker

peft = lazy("peft")
ray = lazy("ray", "ray.train")
safetensors_torch = lazy("safetensors.torch")

# Whole tensors of the trainable (LoRA) parameters only, gathered to rank 0 on the CPU.
FULL_LORA_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)

TRAINER_STATE = "trainer_state.pt"  # step, optimizer and scheduler state; the LoRA weights are the PEFT file
HISTORY = "history.json"


@dataclass
class TrainState:
    step: int = 0
    history: list[dict] = field(default_factory=list)  # one entry per logged step / evaluation / resume


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def lora_state(model) -> dict[str, torch.Tensor]:
    """Whole (unsharded) LoRA weights by their plain names, on rank 0 (empty elsewhere); a collective: every rank
    must call it."""
    names = {n for n, _ in trainable(model)}
    # ignore_frozen_params drops frozen parameters but not the 4-bit layers' quantisation-state entries
    return {k: v for k, v in get_model_state_dict(model, options=FULL_LORA_STATE).items() if k in names}


def local_checkpoints(root: Path) -> list[Path]:
    """Checkpoints written by a run without Ray (checkpoint_<step>), oldest first."""
    return sorted((p for p in root.glob("checkpoint_*") if p.is_dir() and p.name.split("_")[1].isdigit()),
                  key=lambda p: int(p.name.split("_")[1]))


class CheckpointStore:
    """Checkpoint and metrics sink: Ray Train's report in a Ray worker, a local folder otherwise."""

    def __init__(self, cfg: TrainConfig, worker: Worker):
        self.cfg, self.worker = cfg, worker
        self.local_root = Path(cfg.run.storage_path) / cfg.run.name

    def latest(self) -> tuple[Path, str] | None:
        """(a local folder with the latest checkpoint, where it is stored); under Ray the folder is a temporary
        copy the caller deletes."""
        if self.worker.in_ray:
            ck = ray.train.get_checkpoint()
            if ck is None:
                return None
            return Path(ck.to_directory(tempfile.mkdtemp(prefix="resume-"))), ck.path
        cks = local_checkpoints(self.local_root)
        return (cks[-1], str(cks[-1])) if cks else None

    def report(self, metrics: dict, ckpt_dir: Path | None, step: int) -> None:
        """Hand a checkpoint folder (save_checkpoint's temporary one) to storage, then delete it: a long run writes
        one per `run.checkpoint_every_steps`, which would otherwise pile up in the temporary directory."""
        if self.worker.in_ray:
            ck = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
            ray.train.report(metrics, checkpoint=ck, delete_local_checkpoint_after_upload=ck is not None)
        elif ckpt_dir is not None:
            dest = self.local_root / f"checkpoint_{step:06d}"
            if Path(ckpt_dir).resolve() == dest.resolve():  # a finished run handing back its own last checkpoint
                return
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(ckpt_dir, dest)
            shutil.rmtree(ckpt_dir)
            for old in local_checkpoints(self.local_root)[:-self.cfg.run.keep_checkpoints]:
                shutil.rmtree(old)


def save_checkpoint(model, optimizer, scheduler, state: TrainState, worker: Worker) -> Path | None:
    """Write the LoRA weights (PEFT files), trainer state and history to a temporary folder on rank 0 and return it
    (None elsewhere); the caller adds tokenizer and manifest. Every rank must call it: gathering the sharded LoRA
    weights and optimizer state is a collective."""
    weights = lora_state(model)
    optim_state = get_optimizer_state_dict(model, optimizer, options=FULL_LORA_STATE)
    if not worker.main:
        return None
    out = Path(tempfile.mkdtemp(prefix=f"ckpt-{state.step}-"))
    model.save_pretrained(str(out), state_dict=peft.get_peft_model_state_dict(model, state_dict=weights))
    torch.save({"step": state.step, "optimizer": optim_state, "scheduler": scheduler.state_dict()},
               out / TRAINER_STATE)
    (out / HISTORY).write_text(json.dumps(state.history))
    return out


def restore_checkpoint(path: Path, model, optimizer, scheduler, state: TrainState) -> None:
    """Every rank reads the same checkpoint; torch's state-dict helpers shard the weights and optimizer state."""
    saved_state = torch.load(path / TRAINER_STATE, weights_only=False)
    saved = safetensors_torch.load_file(str(path / "adapter_model.safetensors"))
    # The PEFT file leaves out the adapter name: `...q_proj.lora_A.weight` is `...q_proj.lora_A.default.weight`.
    weights = {k.replace(".weight", ".default.weight") if ".lora_" in k else k: v for k, v in saved.items()}
    missing = sorted({n for n, _ in trainable(model)} - set(weights))
    if missing:
        raise RuntimeError(f"checkpoint {path} has no weights for {missing[0]} (and {len(missing) - 1} more): "
                           "was it written with another LoRA config?")
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, optimizer, saved_state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(saved_state["scheduler"])
    state.step = saved_state["step"]
    if (path / HISTORY).is_file():
        state.history = json.loads((path / HISTORY).read_text())
