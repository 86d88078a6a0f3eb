"""Dev-set evaluation during training: answer-token loss on a fixed dev sample (all workers), and constrained
extraction scored with the shared metrics (rank 0, on its own unsharded copy of the model)."""
from __future__ import annotations

import torch

from jsonextract.config.core import prompt_budget
from jsonextract.config.train import EvalConfig, TrainConfig
from jsonextract.data.prompt import PromptBuilder
from jsonextract.data.records import Example, pad_batch, spread
from jsonextract.decoding.extractor import Extractor, extract_in_batches
from jsonextract.evaluation.metrics import score_results
from jsonextract.models.loading import attach_lora, load_base
from jsonextract.training.distributed import Worker, all_reduce_sum
from jsonextract.training.loss import answer_loss


def dev_examples(dev: list[Example], cfg: EvalConfig) -> list[Example]:
    """The fixed dev-loss set: `eval.loss_examples` records spread over the dev file, the same at every evaluation
    and for any number of workers, so a reported dev loss can be recomputed from the adapter alone."""
    return spread(dev, cfg.loss_examples)


def mean_loss(model, examples: list[Example], batch_size: int, pad_id: int, worker: Worker | None = None) -> float:
    """Answer-token-weighted mean loss over `examples`, in micro-batches of `batch_size` dealt round-robin to the
    workers. Under FSDP every rank must run the same number of forward passes (each is a collective), so a
    rank without a batch of its own in the last round repeats one with weight 0."""
    rank, world = (worker.rank, worker.world) if worker else (0, 1)
    device = worker.device if worker else next(model.parameters()).device
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
            total += float(answer_loss(model, b)) * tokens
            count += tokens
    model.train(was_training)
    if worker is not None and world > 1:
        total, count = all_reduce_sum([total, count], worker)
    return total / max(count, 1.0)


class DevDecoder:
    """Rank 0 keeps an unsharded copy of the model (same base, same LoRA config) for constrained decoding on a
    dev sample: generate() under FSDP would need every rank to run the same number of forward passes."""

    def __init__(self, cfg: TrainConfig, worker: Worker, tokenizer, prompt: PromptBuilder, records: list):
        n = cfg.eval.decode_samples
        self.records = spread(records, n) if n else []
        self.batch_size = cfg.decoding.batch_size
        self.model = None
        if worker.main and self.records:
            self.model = attach_lora(load_base(cfg.model, str(worker.device)), cfg.lora)
            self.extractor = Extractor(self.model, tokenizer, prompt, cfg.decoding,
                                       max_prompt_tokens=prompt_budget(cfg.model, cfg.decoding))

    def __call__(self, weights: dict[str, torch.Tensor]) -> dict:
        if self.model is None:
            return {}
        unexpected = self.model.load_state_dict(weights, strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"dev decoder: no parameter {unexpected[0]} in its model copy")
        self.model.eval()
        self.extractor.weights_changed()
        results = extract_in_batches(self.extractor, [r.text for r in self.records], self.batch_size,
                                     contexts=[r.context for r in self.records])
        m = score_results(zip(results, [r.target for r in self.records]))
        out = {"dev_f1": m["f1"], "dev_exact_match": m["exact_match"], "dev_schema_valid": m["schema_valid_rate"]}
        for g, gm in m["groups"].items():
            out[f"dev_{g}_f1"] = gm["f1"]
        return out
