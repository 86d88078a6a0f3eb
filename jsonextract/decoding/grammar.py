"""The grammar's part in decoding: the masks it allows at each position, the continuation it forces (the draft
fed for verification, `Drafter`), the ending it fixes (`forced_end`), and the masked argmax with its
log-probability."""
from __future__ import annotations

import functools

from jsonextract.lazy import lazy

np = lazy("numpy")
torch = lazy("torch")
xgr = lazy("xgrammar")


class Drafter:
    """The tokens of the continuation the grammar forces. Tokenised by the model's tokenizer, as the training
    targets were, not by xgrammar's longest-token match (`find_jump_forward_tokens`): a fine-tuned SmolLM2 agreed
    with far more of these than of xgrammar's (docs/decoding.md). The last token is left out: it may merge with
    the free text that follows (`"` + `play` is one token)."""

    def __init__(self, tokenizer):
        self.encode = functools.lru_cache(maxsize=4096)(
            lambda s: tuple(tokenizer.encode(s, add_special_tokens=False)[:-1]))

    def __call__(self, forced: str) -> list[int]:
        """The draft tokens of `forced`, a matcher's `find_jump_forward_string()`."""
        return list(self.encode(forced)) if forced else []


def forced_end(matcher, bitmask, limit: int, forced: str | None = None) -> list[int] | None:
    """The output's last tokens when the grammar allows exactly one token at each step from here to the stop token
    (a JSON answer's closing braces, then eos), at most `limit` of them; else None. The matcher ends having
    accepted them. Step-by-step decoding emits the same tokens, each the masked argmax over a single allowed token
    (log-probability 0), but feeds each one to the model first, and the token before them too: on Restaurant-8k
    the closing brace and eos after the last value, two of the 40-odd positions a row computes. Unlike a draft,
    these need no check by the model: nothing after them is decoded. `bitmask`: a one-row xgrammar bitmask to
    fill (scratch); `forced`: the matcher's `find_jump_forward_string()`, when the caller has it already."""
    s = matcher.find_jump_forward_string() if forced is None else forced
    if s:
        if not matcher.accept_string(s):
            return None
        completed = matcher.is_completed()
        matcher.rollback(1)  # a string accepted is one step
    else:
        completed = matcher.is_completed()
    if not completed:  # the forced part ends before the grammar does: a choice follows it
        return None
    tokens: list[int] = []
    while len(tokens) < limit and not matcher.is_terminated():
        matcher.fill_next_token_bitmask(bitmask)
        words = bitmask.numpy().view(np.uint32)[0]
        if np.bitwise_count(words).sum() != 1:  # not exactly one token allowed
            matcher.rollback(len(tokens))
            return None
        w = int(np.flatnonzero(words)[0])
        t = w * 32 + int(words[w]).bit_length() - 1
        if not matcher.accept_token(t):
            matcher.rollback(len(tokens))
            return None
        tokens.append(t)
    return tokens


def draft_masks(matcher, draft: list[int], vocab_size: int):
    """The part of `draft` the grammar accepts, and its bitmask rows: the state before each kept draft token,
    then after the last one. The matcher ends having accepted the kept draft (rolled back later for the tokens
    the model rejects)."""
    bm = xgr.allocate_token_bitmask(len(draft) + 1, vocab_size)
    for i, d in enumerate(draft):
        matcher.fill_next_token_bitmask(bm, i)
        if not matcher.accept_token(d):  # a tokenisation the grammar does not allow (e.g. a leading-space token)
            return draft[:i], bm[:i + 1]
    matcher.fill_next_token_bitmask(bm, len(draft))
    return draft, bm


def masked_argmax(logits, bitmask, temperature: float = 1.0) -> tuple[list[int], list[float], list[float]]:
    """Per row: the argmax of the logits the grammar's `bitmask` allows (None: all), and its log-probability
    under the masked distribution at `temperature` and at 1 (max - logsumexp, without a vocabulary-sized
    log_softmax)."""
    if bitmask is not None:
        xgr.apply_token_bitmask_inplace(logits, bitmask)
    top = logits.max(-1).values
    return (logits.argmax(-1).tolist(), *log_probs(top, logits, temperature))


def log_probs(top, logits, temperature: float) -> tuple[list[float], list[float]]:
    """(log-probabilities of the `top` logits among each row of `logits` at `temperature`, and at 1). The argmax
    does not depend on the temperature; the confidence reported does (calibration.fit_temperature)."""
    at_one = (top - torch.logsumexp(logits, -1)).tolist()
    if temperature == 1.0:
        return at_one, at_one
    return (top / temperature - torch.logsumexp(logits / temperature, -1)).tolist(), at_one
