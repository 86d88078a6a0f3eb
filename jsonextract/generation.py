"""Greedy decoding with a KV cache, grammar masks, jump-forward drafts and a shared prompt prefix.

Why not `model.generate` with a logits processor (what this project used before): a JSON answer is largely
forced by the grammar (keys in schema order, quotes, colons, braces), yet generate() spends one forward pass per
token, and it recomputes the prompt start every row shares. This loop differs in two ways, and is otherwise the
same greedy decoding (same masks, same argmax, same position ids as generate's left padding):

- Jump-forward with verification: after each sampled token, xgrammar's `find_jump_forward_tokens` proposes the
  tokens of the continuation the grammar forces. They are fed with the sampled token in one forward pass and
  accepted only while the model's own masked argmax at each position agrees (speculative decoding with the
  grammar as the draft). At the first disagreement the model's token is taken, the matcher rolls back, and the
  rejected positions stay in the cache as masked holes. So the output is the one step-by-step decoding gives,
  token for token (up to float rounding of a multi-token forward pass, which the tests check on real schemas),
  while a forced run of k tokens costs one pass instead of k. Rows with and without drafts share each pass.
- Shared prefix: the rendered prompts of a batch start with the same tokens (chat template + instruction [+
  schema]). Their keys/values are computed once and kept between calls; each row's remaining prompt is laid out
  after them, left-padded, the padding being masked holes in the middle. Position ids count only real tokens,
  so every row sees positions 0..n-1 as in an unpadded run.

Rows that finish leave the batch (their cache rows are dropped), so a long tail decodes at a small batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Generated:
    tokens: list[list[int]]  # per row, the emitted tokens (eos last when the row ended)
    logprobs: list[list[float]]  # per emitted token, its log-probability under the masked distribution
    forward_passes: int = 0  # model calls, prefix and prompt included
    drafted: int = 0  # tokens proposed by jump-forward
    accepted: int = 0  # drafted tokens the model confirmed: emitted without a forward pass of their own


@dataclass
class DecodeStats:
    """Running totals over generate calls (what the benchmark and the batch summary report)."""
    calls: int = 0
    output_tokens: int = 0
    forward_passes: int = 0
    drafted: int = 0
    accepted: int = 0

    def add(self, g: Generated) -> None:
        self.calls += 1
        self.output_tokens += sum(len(t) for t in g.tokens)
        self.forward_passes += g.forward_passes
        self.drafted += g.drafted
        self.accepted += g.accepted

    def as_dict(self) -> dict:
        return {**self.__dict__, "forced_share": self.accepted / max(self.output_tokens, 1)}


@dataclass
class PrefixCache:
    """Keys/values of the prompt start shared by all rows; recomputed only when a batch does not start with it."""
    ids: tuple[int, ...] = ()
    kv: list = field(default_factory=list)  # per layer (keys, values), batch 1
    hits: int = 0

    def for_batch(self, model, prompts: list[list[int]], device) -> int:
        """Length of the cached prefix to use for `prompts` (0: none), computing it if needed."""
        import torch

        n = common_prefix(prompts)
        n = min(n, min(len(p) for p in prompts) - 1)  # every row keeps at least one token of its own
        if n < 1:
            return 0
        if self.ids and len(self.ids) <= n and tuple(prompts[0][:len(self.ids)]) == self.ids:
            self.hits += 1
            return len(self.ids)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([prompts[0][:n]], device=device), use_cache=True, logits_to_keep=1)
        self.ids = tuple(prompts[0][:n])
        self.kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        return n

    def expand(self, batch: int):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(self.kv):
            cache.update(k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous(), i)
        return cache


def common_prefix(rows: list[list[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows)
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return n


class _Row:
    """One row's decoding state: its matcher, what it emitted, and the draft it feeds next."""
    __slots__ = ("matcher", "tokens", "logprobs", "pos", "draft", "masks", "done")

    def __init__(self, matcher, pos: int):
        self.matcher = matcher
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.pos = pos  # position id of the last token fed (the next one fed gets pos + 1 + accepted drafts)
        self.draft: list[int] = []
        self.masks = None  # bitmask rows: before each draft token, then after the last
        self.done = False


def greedy_generate(model, prompts: list[list[int]], *, max_new: int, eos_id: int, pad_id: int,
                    grammars: list | None = None, vocab_size: int = 0, jump_forward: bool = True,
                    prefix: PrefixCache | None = None) -> Generated:
    """Greedy continuation of each prompt, masked by its compiled grammar when `grammars` is given."""
    import torch
    from transformers import DynamicCache

    if grammars is not None:
        import xgrammar as xgr
    device = next(model.parameters()).device
    B = len(prompts)
    rows = [_Row(xgr.GrammarMatcher(g) if grammars is not None else None, len(p) - 1)
            for p, g in zip(prompts, grammars or [None] * B)]
    jump_forward = jump_forward and grammars is not None
    gen = Generated([r.tokens for r in rows], [r.logprobs for r in rows])

    # Prompt: the shared prefix from the cache, then each row's rest, left-padded (padding = holes).
    P = prefix.for_batch(model, prompts, device) if prefix is not None else 0
    cache = prefix.expand(B) if P else DynamicCache()
    S = max(len(p) for p in prompts) - P
    x = torch.full((B, S), pad_id, dtype=torch.long)
    m = torch.zeros((B, S), dtype=torch.long)
    for j, p in enumerate(prompts):
        x[j, S - len(p) + P:] = torch.tensor(p[P:])
        m[j, S - len(p) + P:] = 1
    attn = torch.cat([torch.ones((B, P), dtype=torch.long), m], dim=1)
    pos = (P + m.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(input_ids=x.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
                       cache=cache, use_cache=True, logits_to_keep=1).logits.float().cpu()
    gen.forward_passes += 1
    alive = list(range(B))  # row index of each batch slot
    for r in rows:
        r.masks = _masks(r.matcher, [], vocab_size) if grammars is not None else None

    while True:
        # 1. choose: check each slot's draft against the model's masked argmax at its positions of the last pass
        #    (chunk position i predicts draft token i; position n, the token after the draft), then take one token.
        sel = [(s, i) for s, j in enumerate(alive) for i in range(len(rows[j].draft) + 1)]
        flat = logits[[s for s, _ in sel], [i for _, i in sel]]
        if grammars is not None:
            xgr.apply_token_bitmask_inplace(flat, torch.cat([rows[alive[s]].masks[i:i + 1] for s, i in sel]))
        best = flat.argmax(-1).tolist()
        lp = (flat.max(-1).values - torch.logsumexp(flat, -1)).tolist()
        width = logits.shape[1]
        k = 0
        for s, j in enumerate(alive):
            r = rows[j]
            n = len(r.draft)
            take = next((i for i, d in enumerate(r.draft) if best[k + i] != d), n)
            r.tokens += r.draft[:take]
            r.logprobs += lp[k:k + take]
            gen.accepted += take
            if take < n:  # rejected draft tokens: undo them in the matcher, mask their cache entries
                r.matcher.rollback(n - take)
                attn[s, attn.shape[1] - width + 1 + take:attn.shape[1] - width + 1 + n] = 0
            r.pos += 1 + take
            if len(r.tokens) < max_new:
                tok = best[k + take]
                r.tokens.append(tok)
                r.logprobs.append(lp[k + take])
                if r.matcher is not None and not r.matcher.accept_token(tok):
                    r.done = True  # the grammar allowed nothing: the output is cut here and fails validation
                if tok == eos_id or (r.matcher is not None and r.matcher.is_terminated()):
                    r.done = True
            r.done = r.done or len(r.tokens) >= max_new
            k += n + 1
            # 2. draft: the tokens the grammar forces next, fed with `tok` in the next pass.
            r.draft = []
            if not r.done and jump_forward:
                r.draft = r.matcher.find_jump_forward_tokens()[:max_new - len(r.tokens)]
                gen.drafted += len(r.draft)
            if not r.done and grammars is not None:
                r.masks = _masks(r.matcher, r.draft, vocab_size)
        # 3. drop finished rows, feed the others: [last token] + draft, right-padded (padding = holes).
        keep = [s for s, j in enumerate(alive) if not rows[j].done]
        if not keep:
            break
        if len(keep) < len(alive):
            idx = torch.tensor(keep)
            cache.batch_select_indices(idx.to(device))
            attn = attn[idx]
            alive = [alive[s] for s in keep]
        T = max(len(rows[j].draft) + 1 for j in alive)
        x = torch.full((len(alive), T), pad_id, dtype=torch.long)
        m = torch.zeros((len(alive), T), dtype=torch.long)
        for s, j in enumerate(alive):
            feed = [rows[j].tokens[-1]] + rows[j].draft
            x[s, :len(feed)] = torch.tensor(feed)
            m[s, :len(feed)] = 1
        pos = torch.tensor([rows[j].pos for j in alive]).unsqueeze(1) + torch.arange(T)
        attn = torch.cat([attn, m], dim=1)
        with torch.inference_mode():
            logits = model(input_ids=x.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
                           cache=cache, use_cache=True).logits.float().cpu()
        gen.forward_passes += 1
    return gen


def _masks(matcher, draft: list[int], vocab_size: int):
    """Bitmask rows for a draft: the state before each draft token, then after the last one. The matcher ends
    having accepted the draft (rolled back later for the tokens the model rejects)."""
    import xgrammar as xgr

    bm = xgr.allocate_token_bitmask(len(draft) + 1, vocab_size)
    for i, d in enumerate(draft):
        matcher.fill_next_token_bitmask(bm, i)
        if not matcher.accept_token(d):  # cannot happen for xgrammar's own proposal; keep the loop safe anyway
            del draft[i:]
            return bm[:i + 1]
    matcher.fill_next_token_bitmask(bm, len(draft))
    return bm
