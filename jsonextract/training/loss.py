"""The training loss: mean next-token cross-entropy over the answer tokens only (labels -100 on the prompt).

Two ways to compute it, the same value:
- `fused` (default): the model's forward runs with its output head passed through, so it returns the final
  hidden states at the answer positions; `answer_cross_entropy` then projects exactly the answer tokens onto
  the vocabulary, takes the log-sum-exp and keeps the gradient of the logits (softmax - one-hot) in the
  compute dtype. The vocabulary-sized fp32 tensors of the plain path (the logits' cast, log_softmax, its
  gradient, the zero-filled gradient of the target gather) are never made, and padding or prompt positions of
  other rows in the batch are never projected.
- `logits`: the model's own logits at the union over rows of the answer positions, then torch's cross_entropy.
  Used where the head trains (a LoRA on `lm_head`) and when asked for (optim.loss=logits).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from jsonextract.decoding.vocab_head import derived


def answer_loss(model, batch: dict, fused: bool = True) -> torch.Tensor:
    """Mean loss on the answer tokens of `batch` (input_ids, attention_mask, labels; right padded).

    Both paths go through the model's own forward, so under FSDP2 the root module's hooks run (they all-gather
    what the root shards: a LoRA on the output head); `logits_to_keep` takes one set of positions for the whole batch."""
    labels = batch["labels"][:, 1:]  # position p predicts token p + 1
    keep = (labels != -100).any(0).nonzero().squeeze(1)
    targets = labels[:, keep]
    head = model.get_output_embeddings()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits_to_keep": keep,
              "use_cache": False}  # training reads no cache: none is built
    if not (fused and frozen_linear(head)):
        logits = model(**inputs).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    with passes_input_through(head):
        hidden = model(**inputs).logits  # [batch, kept positions, hidden]: the head returned its input
    answer = targets != -100
    return answer_cross_entropy(hidden[answer], head.weight, targets[answer])


def frozen_linear(head) -> bool:
    """A plain bias-free Linear whose weight does not train: the fused loss computes no weight gradient."""
    return type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad


@contextlib.contextmanager
def passes_input_through(module: torch.nn.Module):
    """For the duration, `module(x)` returns x (an instance attribute shadows the class's forward; one that was
    there already, such as a hook library's wrapper, is put back after)."""
    own = module.__dict__.get("forward")
    module.forward = lambda x: x
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matrix product of `x` runs in here: autocast's where it is on (the CPU's bf16 autocast on
    native-bf16 CPUs), else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype`, kept on the weight while it is unchanged (vocab_head.derived): casting SmolLM2's
    49,152 x 576 tied embedding every micro-batch took longer than its product."""
    return weight if weight.dtype == dtype else derived(weight, ("answer_loss", dtype), lambda w: w.detach().to(dtype))


class _AnswerCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, rows):
        n = hidden.shape[0]
        w = _cast(weight, dtype)
        h = hidden.detach().to(dtype)
        grads, total = [], hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, n, rows):  # bounded fp32 temporaries for large vocabularies and batches
            logits = (h[s:s + rows] @ w.t()).float()
            t = targets[s:s + rows, None]
            lse = logits.logsumexp(-1, keepdim=True)
            total += (lse - logits.gather(1, t)).sum()
            logits.sub_(lse).exp_()  # softmax, in place
            logits.scatter_add_(1, t, logits.new_full(t.shape, -1.0))  # - one-hot: d loss / d logits
            grads.append(logits.to(dtype))
        ctx.save_for_backward(torch.cat(grads) if len(grads) > 1 else grads[0])
        ctx.weight, ctx.dtype, ctx.hidden_dtype, ctx.n = w, dtype, hidden.dtype, n
        return total / max(n, 1)

    @staticmethod
    def backward(ctx, grad_out):
        (dlogits,) = ctx.saved_tensors
        grad_hidden = (dlogits @ ctx.weight).float().mul_(grad_out / max(ctx.n, 1)).to(ctx.hidden_dtype)
        return grad_hidden, None, None, None, None


def answer_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         max_elements: int = 1 << 25) -> torch.Tensor:
    """mean over rows of cross_entropy(hidden @ weight.T, targets), for a frozen `weight` ([vocab, hidden]):
    gradients flow to `hidden` only. Products in the compute dtype, log-sum-exp in fp32."""
    rows = max(max_elements // weight.shape[0], 1)
    return _AnswerCrossEntropy.apply(hidden, weight, targets, compute_dtype(hidden), rows)
