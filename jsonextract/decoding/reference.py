"""The reference engine (`decoding.engine=generate`): the same greedy decoding through transformers' `generate()`
with a grammar logits processor. For architectures whose cache the loop does not handle, and the baseline
bench/extract.py measures the loop against."""
from __future__ import annotations

from jsonextract.decoding.generated import Generated
from jsonextract.decoding.grammar import log_probs
from jsonextract.lazy import lazy

torch = lazy("torch")
xgr = lazy("xgrammar")


class _GrammarMask:
    """Per-row grammar masks as a `generate()` logits processor, recording each step's masked log-probability
    of the greedy token (max - logsumexp, without a vocabulary-sized log_softmax)."""

    def __init__(self, compiled: list | None, batch: int, vocab_size: int, temperature: float = 1.0):
        self.matchers = None
        self.temperature = temperature
        self.raw: list = []
        if compiled is not None:
            self.xgr = xgr
            self.matchers = [xgr.GrammarMatcher(g) for g in compiled]
            self.bitmask = xgr.allocate_token_bitmask(batch, vocab_size)
            self.rejected = [False] * batch
        self.steps: list = []

    def __call__(self, input_ids, scores):
        if self.matchers is not None:
            if self.steps:
                for i, (m, t) in enumerate(zip(self.matchers, input_ids[:, -1].tolist())):
                    if not m.is_terminated() and not self.rejected[i]:
                        self.rejected[i] = not m.accept_token(t)
            for i, m in enumerate(self.matchers):
                if m.is_terminated() or self.rejected[i]:
                    self.bitmask[i].fill_(-1)  # finished rows: allow everything (generate pads them anyway)
                else:
                    m.fill_next_token_bitmask(self.bitmask, i)
            device = scores.device
            scores = scores.to("cpu") if device.type != "cuda" else scores
            self.xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device))
            scores = scores.to(device)
        x = scores.float()
        at_t, at_one = log_probs(x.max(-1).values, x, self.temperature)
        self.steps.append(at_t)
        self.raw.append(at_one)
        return scores


def reference_generate(model, prompts: list[list[int]], *, max_new: int, eos_id: int, pad_id: int,
                       grammars: list | None = None, vocab_size: int = 0, temperature: float = 1.0) -> Generated:
    """The same greedy decoding through transformers' `generate()` with a grammar logits processor: one forward
    pass per token, every row until the longest ends. For architectures whose cache the loop above does not
    handle (recurrent or sliding-window state), and as the baseline the benchmark measures against."""
    n = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (n - len(p)) + p for p in prompts])
    mask = (torch.arange(n) >= torch.tensor([n - len(p) for p in prompts]).unsqueeze(1)).long()
    proc = _GrammarMask(grammars, len(prompts), vocab_size, temperature)
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                             do_sample=False, logits_processor=[proc], eos_token_id=eos_id, pad_token_id=pad_id)
    tokens, logprobs, raw = [], [], []
    for j, row in enumerate(out[:, n:].tolist()):
        row = row[:row.index(eos_id) + 1] if eos_id in row else [t for t in row if t != pad_id]
        tokens.append(row)
        logprobs.append([float(proc.steps[k][j]) for k in range(len(row))])
        raw.append([float(proc.raw[k][j]) for k in range(len(row))])
    steps = len(proc.steps)
    return Generated(tokens, logprobs, raw_logprobs=raw, forward_passes=steps, fed=len(prompts) * (n + steps - 1),
                     padding=int((mask == 0).sum()) + sum(steps - len(t) for t in tokens))
