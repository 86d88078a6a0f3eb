"""Greedy decoding with a KV cache, grammar masks, jump-forward drafts and a shared prompt prefix.

Why not `model.generate` with a logits processor (`reference_generate` below, `decoding.engine=generate`): a JSON
answer is largely forced by the grammar (keys in schema order, quotes, colons, braces), yet generate() spends one
forward pass per token, keeps finished rows in the batch until the longest ends, and recomputes the prompt start
every row shares. This loop is otherwise the same greedy decoding (same masks, same argmax, same position ids as
generate's left padding; tests compare them token for token):

- Jump-forward with verification: after each sampled token, the continuation the grammar forces is the draft
  (`Drafter`). It is fed with the sampled token in one forward pass and accepted only while the model's own
  masked argmax at each position agrees (speculative decoding with the grammar as the draft model). At the first
  disagreement the model's token is taken, the matcher rolls back, and the rejected positions stay in the cache
  as masked holes. So the output is the one step-by-step decoding gives, while a forced run of k tokens costs one
  pass instead of k. Rows with and without drafts share each pass; the pass width is chosen by `PassCost`
  (on a CPU, where compute per position dominates, padding every row to the longest draft cost more than the
  passes it saved).
- Shared prefix: the rendered prompts of a batch start with the same tokens (chat template + instruction [+
  schema]). Their keys/values are computed once and kept between calls; each row's remaining prompt is laid out
  after them, left-padded, the padding being masked holes in the middle. Position ids count only real tokens,
  so every row sees positions 0..n-1 as in an unpadded run.
- Rows that finish leave the batch (their cache rows are dropped), so a long tail decodes at a small batch.
- Prompts in length groups: one left-padded prompt pass computes every row at the longest row's length (on
  SNIPS 39% and on Restaurant-8k 62% of that pass was padding). Rows are sorted by length and split where the
  padding saved is worth a pass's overhead (`PassCost`); each group's cache is then widened with holes to a
  common length and all rows decode together.
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
    fed: int = 0  # positions the model computed (prompt and decode passes, padding included)
    padding: int = 0  # of which padding: no token (left padding, short chunks, finished rows kept by generate())


class Drafter:
    """The tokens of the continuation the grammar forces. Tokenised by the model's tokenizer, as the training
    targets were, not by xgrammar's longest-token match (`find_jump_forward_tokens`): a fine-tuned SmolLM2 agreed
    with 99% of these and with 59% of xgrammar's (32 SNIPS rows). The last token is left out: it may merge with
    the free text that follows (`"` + `play` is one token)."""

    def __init__(self, tokenizer):
        import functools
        self.encode = functools.lru_cache(maxsize=4096)(
            lambda s: tuple(tokenizer.encode(s, add_special_tokens=False)[:-1]))

    def __call__(self, matcher) -> list[int]:
        s = matcher.find_jump_forward_string()
        return list(self.encode(s)) if s else []


class PassCost:
    """What one decode pass costs, learnt from the passes themselves: seconds = overhead + per_position x
    positions (a least-squares line over the passes timed so far). Jump-forward widens a pass to the longest
    draft and pads the other rows; where compute per position dominates (a CPU), a wide pass for a few drafts
    costs more than the passes it saves, so the loop picks the chunk width with the most tokens per second
    under this line. Until it has measured, it assumes `prior` positions' worth of overhead per pass."""

    def __init__(self, prior: float):
        self.prior = prior
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0

    @classmethod
    def for_device(cls, device) -> "PassCost":
        # Until the line is learnt (8 passes): on a CPU a pass's fixed cost is small next to its compute per
        # position; on a GPU at these batch sizes a pass is nearly all fixed cost, so every pass goes full width.
        return cls(prior=2.0 if str(device).startswith("cpu") else 1e4)

    def add(self, positions: int, seconds: float) -> None:
        self.n += 1
        self.sx += positions
        self.sy += seconds
        self.sxx += positions * positions
        self.sxy += positions * seconds

    def overhead_positions(self) -> float:
        """The fixed cost of a pass, in positions' worth of compute."""
        var = self.n * self.sxx - self.sx * self.sx
        if self.n < 8 or var <= 0:
            return self.prior
        slope = (self.n * self.sxy - self.sx * self.sy) / var
        if slope <= 0:
            return 1e4  # no measurable cost per position: passes are all overhead (a GPU at small batch)
        return min(max((self.sy - slope * self.sx) / self.n / slope, 0.0), 1e4)

    def best_width(self, lengths: list[int]) -> int:
        """Chunk width maximising tokens advanced per unit of cost, for rows wanting `lengths` positions."""
        k0 = self.overhead_positions()
        return max(sorted(set(lengths)), key=lambda T: sum(min(n, T) for n in lengths) / (k0 + len(lengths) * T))


@dataclass
class DecodeStats:
    """Running totals over generate calls (what bench/extract.py reports)."""
    calls: int = 0
    output_tokens: int = 0
    forward_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    fed: int = 0
    padding: int = 0

    def add(self, g: Generated) -> None:
        self.calls += 1
        self.output_tokens += sum(len(t) for t in g.tokens)
        self.forward_passes += g.forward_passes
        self.drafted += g.drafted
        self.accepted += g.accepted
        self.fed += g.fed
        self.padding += g.padding

    def as_dict(self) -> dict:
        return {**self.__dict__, "forced_share": self.accepted / max(self.output_tokens, 1)}


@dataclass
class PrefixCache:
    """Keys/values of the prompt start shared by all rows; recomputed only when a batch does not start with it."""
    ids: tuple[int, ...] = ()
    kv: list = field(default_factory=list)  # per layer (keys, values), batch 1
    hits: int = 0  # batches that reused the cached prefix
    misses: int = 0  # batches that computed it

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
        self.misses += 1
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
                    grammars: list | None = None, vocab_size: int = 0, drafter: Drafter | None = None,
                    prefix: PrefixCache | None = None, cost: PassCost | None = None) -> Generated:
    """Greedy continuation of each prompt, masked by its compiled grammar when `grammars` is given; jump-forward
    when a `drafter` is given. `prefix`, `cost`: the prefix cache and pass-cost model kept between calls."""
    import time

    import torch
    from transformers import DynamicCache

    if grammars is not None:
        import xgrammar as xgr
    device = next(model.parameters()).device
    B = len(prompts)
    rows = [_Row(xgr.GrammarMatcher(g) if grammars is not None else None, len(p) - 1)
            for p, g in zip(prompts, grammars or [None] * B)]
    jump_forward = drafter is not None and grammars is not None
    cost = cost or PassCost.for_device(device)
    gen = Generated([r.tokens for r in rows], [r.logprobs for r in rows])

    # Prompt: the shared prefix from the cache, then each row's rest, left-padded (padding = holes), by groups
    # of similar length; `alive` lists the rows in group order (the batch slots' order from here on).
    misses = prefix.misses if prefix is not None else 0
    P = prefix.for_batch(model, prompts, device) if prefix is not None else 0
    S = max(len(p) for p in prompts) - P
    groups = length_groups([len(p) - P for p in prompts], cost.overhead_positions())
    parts = []
    for g in groups:
        Sg = max(len(prompts[j]) for j in g) - P
        x = torch.full((len(g), Sg), pad_id, dtype=torch.long)
        m = torch.zeros((len(g), S), dtype=torch.long)  # the group's own padding, plus holes up to S
        for s, j in enumerate(g):
            x[s, Sg - len(prompts[j]) + P:] = torch.tensor(prompts[j][P:])
            m[s, S - len(prompts[j]) + P:] = 1
        attn = torch.cat([torch.ones((len(g), P), dtype=torch.long), m], dim=1)
        own = torch.cat([attn[:, :P], m[:, S - Sg:]], dim=1)  # the group's pass: no holes beyond its own padding
        pos = (P + m[:, S - Sg:].cumsum(1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = model(input_ids=x.to(device), attention_mask=own.to(device),
                        position_ids=pos.to(device), cache=prefix.expand(len(g)) if P else DynamicCache(),
                        use_cache=True, logits_to_keep=1)
        parts.append((out.logits.float().cpu(), out.cache, attn, Sg))
        gen.forward_passes += 1
        gen.fed += len(g) * Sg
        gen.padding += len(g) * Sg - int(m.sum())
    gen.fed += P if prefix is not None and prefix.misses > misses else 0
    alive = [j for g in groups for j in g]  # row index of each batch slot
    logits = torch.cat([lg for lg, *_ in parts])
    attn = torch.cat([a for *_, a, _ in parts])
    cache = _join_caches([(c, S - Sg) for _, c, _, Sg in parts], P) if len(parts) > 1 else parts[0][1]
    for r in rows:
        r.masks = _masks(r.matcher, [], vocab_size)[1] if grammars is not None else None

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
                r.draft = drafter(r.matcher)[:max_new - len(r.tokens)]
            if not r.done and grammars is not None:
                r.draft, r.masks = _masks(r.matcher, r.draft, vocab_size)
        # 3. drop finished rows, feed the others: [last token] + draft, right-padded (padding = holes).
        keep = [s for s, j in enumerate(alive) if not rows[j].done]
        if not keep:
            break
        if len(keep) < len(alive):
            idx = torch.tensor(keep)
            cache.batch_select_indices(idx.to(device))
            attn = attn[idx]
            alive = [alive[s] for s in keep]
        T = cost.best_width([len(rows[j].draft) + 1 for j in alive]) if jump_forward else 1
        for j in alive:  # drafts longer than the pass: the rest is proposed again after this pass
            r = rows[j]
            if len(r.draft) >= T:
                r.matcher.rollback(len(r.draft) - (T - 1))
                r.draft, r.masks = r.draft[:T - 1], r.masks[:T]
            gen.drafted += len(r.draft)
        x = torch.full((len(alive), T), pad_id, dtype=torch.long)
        m = torch.zeros((len(alive), T), dtype=torch.long)
        for s, j in enumerate(alive):
            feed = [rows[j].tokens[-1]] + rows[j].draft
            x[s, :len(feed)] = torch.tensor(feed)
            m[s, :len(feed)] = 1
        pos = torch.tensor([rows[j].pos for j in alive]).unsqueeze(1) + torch.arange(T)
        attn = torch.cat([attn, m], dim=1)
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = model(input_ids=x.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
                           cache=cache, use_cache=True).logits.float().cpu()
        cost.add(len(alive) * T, time.perf_counter() - t0)
        gen.forward_passes += 1
        gen.fed += len(alive) * T
        gen.padding += int((m == 0).sum())
    return gen


def length_groups(lengths: list[int], overhead: float) -> list[list[int]]:
    """Rows (indices into `lengths`) sorted by length and cut into contiguous groups minimising the positions
    computed, padding included, plus `overhead` positions per pass (an exact partition by dynamic programming)."""
    order = sorted(range(len(lengths)), key=lambda j: lengths[j])
    best = [0.0] + [float("inf")] * len(order)  # best[e]: cost of the first e rows
    cut = [0] * (len(order) + 1)
    for e in range(1, len(order) + 1):
        for b in range(e):  # group order[b:e], padded to its longest row, lengths[order[e - 1]]
            c = best[b] + overhead + (e - b) * lengths[order[e - 1]]
            if c < best[e]:
                best[e], cut[e] = c, b
    groups, e = [], len(order)
    while e:
        groups.append(order[cut[e]:e])
        e = cut[e]
    return groups[::-1]


def _join_caches(parts: list, prefix_len: int):
    """One cache from per-group caches, each widened by `holes` masked positions after the shared prefix."""
    import torch
    from transformers import DynamicCache

    def widen(t, holes):
        if not holes:
            return t
        gap = t.new_zeros(*t.shape[:2], holes, t.shape[3])
        return torch.cat([t[:, :, :prefix_len], gap, t[:, :, prefix_len:]], dim=2)

    cache = DynamicCache()
    for i in range(len(parts[0][0].layers)):
        keys = [widen(c.layers[i].keys, h) for c, h in parts]
        values = [widen(c.layers[i].values, h) for c, h in parts]
        cache.update(torch.cat(keys), torch.cat(values), i)
    return cache


def _masks(matcher, draft: list[int], vocab_size: int):
    """The part of `draft` the grammar accepts, and its bitmask rows: the state before each kept draft token,
    then after the last one. The matcher ends having accepted the kept draft (rolled back later for the tokens
    the model rejects)."""
    import xgrammar as xgr

    bm = xgr.allocate_token_bitmask(len(draft) + 1, vocab_size)
    for i, d in enumerate(draft):
        matcher.fill_next_token_bitmask(bm, i)
        if not matcher.accept_token(d):  # a tokenisation the grammar does not allow (e.g. a leading-space token)
            return draft[:i], bm[:i + 1]
    matcher.fill_next_token_bitmask(bm, len(draft))
    return draft, bm


# ---------------------------------------------------------------------------------------------- reference engine


class _GrammarMask:
    """Per-row grammar masks as a `generate()` logits processor, recording each step's masked log-probability
    of the greedy token (max - logsumexp, without a vocabulary-sized log_softmax)."""

    def __init__(self, compiled: list | None, batch: int, vocab_size: int):
        self.matchers = None
        if compiled is not None:
            import xgrammar as xgr
            self.xgr = xgr
            self.matchers = [xgr.GrammarMatcher(g) for g in compiled]
            self.bitmask = xgr.allocate_token_bitmask(batch, vocab_size)
            self.rejected = [False] * batch
        self.steps: list = []

    def __call__(self, input_ids, scores):
        import torch
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
        self.steps.append((x.max(-1).values - torch.logsumexp(x, -1)).cpu())
        return scores


def reference_generate(model, prompts: list[list[int]], *, max_new: int, eos_id: int, pad_id: int,
                       grammars: list | None = None, vocab_size: int = 0) -> Generated:
    """The same greedy decoding through transformers' `generate()` with a grammar logits processor: one forward
    pass per token, every row until the longest ends. For architectures whose cache the loop above does not
    handle (recurrent or sliding-window state), and as the baseline the benchmark measures against."""
    import torch

    n = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (n - len(p)) + p for p in prompts])
    mask = (torch.arange(n) >= torch.tensor([n - len(p) for p in prompts]).unsqueeze(1)).long()
    proc = _GrammarMask(grammars, len(prompts), vocab_size)
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new,
                             do_sample=False, logits_processor=[proc], eos_token_id=eos_id, pad_token_id=pad_id)
    tokens, logprobs = [], []
    for j, row in enumerate(out[:, n:].tolist()):
        row = row[:row.index(eos_id) + 1] if eos_id in row else [t for t in row if t != pad_id]
        tokens.append(row)
        logprobs.append([float(proc.steps[k][j]) for k in range(len(row))])
    steps = len(proc.steps)
    return Generated(tokens, logprobs, forward_passes=steps, fed=len(prompts) * (n + steps - 1),
                     padding=int((mask == 0).sum()) + sum(steps - len(t) for t in tokens))
