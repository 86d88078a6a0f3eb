"""Where a training worker runs (rank, world, device) and how the model is sharded across workers (FSDP2)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from jsonextract.config.train import TrainConfig
from jsonextract.lazy import lazy
from jsonextract.models.loading import torch_dtype

ray = lazy('ray', 'ray.train', 'ray.train.torch')


@dataclass(frozen=True)
class Worker:
    rank: int
    world: int
    local_rank: int  # rank among the workers of this node
    device: torch.device
    in_ray: bool  # started by Ray Train (reports and checkpoints go through ray.train)
    node: str  # the Ray node id (the host name without Ray)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def node_main(self) -> bool:
        return self.local_rank == 0


def setup_distributed(cfg: TrainConfig) -> Worker:
    try:
        ctx = ray.train.get_context()
        in_ray = ctx.get_world_size() >= 1 and dist.is_initialized()
    except Exception:
        in_ray = False
    if in_ray:
        return Worker(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), ray.train.torch.get_device(),
                      True, ray.get_runtime_context().get_node_id())
    if not dist.is_initialized():  # one process, world size 1: FSDP2 still needs a process group
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        use_cuda = cfg.run.use_gpu and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=0, world_size=1)
    device = torch.device("cuda", 0) if cfg.run.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    return Worker(0, 1, 0, device, False, socket.gethostname())


def all_reduce_sum(values: list[float], worker: Worker) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=worker.device if worker.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def decoder_layers(model) -> list[torch.nn.Module]:
    for m in model.modules():
        layers = getattr(m, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and hasattr(layers[0], "self_attn"):
            return list(layers)
    raise RuntimeError("could not find the decoder layers to shard (expected a `.layers` ModuleList)")


def shard_fsdp2(model, cfg: TrainConfig, worker: Worker) -> None:
    """FSDP2 over the model: each decoder layer its own unit, then the root (one all-gather per layer in forward
    and in backward), or, with parallel.shard_frozen=false, the root alone over the trainable weights.

    Frozen weights need no gradient reduction and every rank loads the same base, so a rank may keep its own
    whole copy (`ignored_params`) and the copies agree. The root's frozen parameters (the embedding, which the
    output head shares, and the final norm) are always kept whole: sharding them saves little memory, and it costs
    an all-gather of the vocabulary-sized embedding into a freshly allocated buffer at every forward and backward.
    Trainable parameters at the root (a LoRA on the output head) are sharded.

    parallel.shard_frozen=false keeps the layers' frozen 4-bit weights whole too. What is left to shard is the LoRA
    weights, a few MB, so units per layer would buy no memory and cost a collective per layer and pass, each a
    point where one rank waits for the other: the root alone all-gathers them once per forward (the root stays
    gathered for its backward) and reduce-scatters their gradients once per step."""
    kwargs: dict[str, Any] = {}
    if worker.device.type == "cuda" and cfg.parallel.mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch_dtype(cfg.model.dtype), reduce_dtype=torch.float32)
    if not cfg.parallel.shard_frozen:
        fully_shard(model, ignored_params={p for p in model.parameters() if not p.requires_grad} or None, **kwargs)
        return
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **kwargs)
    inside = {id(p) for layer in layers for p in layer.parameters()}
    frozen = {p for p in model.parameters() if not p.requires_grad and id(p) not in inside}
    fully_shard(model, ignored_params=frozen or None, **kwargs)
