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
  padding saved is worth a pass's overhead (`PassCost`); each group writes its cache in place into one buffer
  per layer for all rows, behind masked holes up to a common length (`_Slab`), and all rows decode together.
- On a CPU the loop projects the final hidden states onto the vocabulary itself (`VocabHead`): only where it
  reads a token, and onto the grammar's allowed tokens where they are few. The key/value cache grows in place
  (`_growing`) and rows that finish are replaced by the last rows (`fill_holes`), so a pass copies neither the
  whole cache nor every remaining row.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field


@dataclass
class Generated:
    tokens: list[list[int]]  # per row, the emitted tokens (eos last when the row ended)
    logprobs: list[list[float]]  # per emitted token, its log-probability under the masked distribution (at the temperature)
    forward_passes: int = 0  # model calls, prefix and prompt included
    drafted: int = 0  # tokens proposed by jump-forward
    accepted: int = 0  # drafted tokens the model confirmed: emitted without a forward pass of their own
    ended: int = 0  # tokens of forced endings (`forced_end`): emitted without any pass, the row done
    fed: int = 0  # positions the model computed (prompt and decode passes, padding included)
    padding: int = 0  # of which padding: no token (left padding, short chunks, finished rows kept by generate())
    raw_logprobs: list[list[float]] | None = None  # the same at temperature 1 (None: equal to logprobs)


class Drafter:
    """The tokens of the continuation the grammar forces. Tokenised by the model's tokenizer, as the training
    targets were, not by xgrammar's longest-token match (`find_jump_forward_tokens`): a fine-tuned SmolLM2 agreed
    with 99% of these and with 59% of xgrammar's (32 SNIPS rows). The last token is left out: it may merge with
    the free text that follows (`"` + `play` is one token)."""

    def __init__(self, tokenizer):
        import functools
        self.encode = functools.lru_cache(maxsize=4096)(
            lambda s: tuple(tokenizer.encode(s, add_special_tokens=False)[:-1]))

    def __call__(self, forced: str) -> list[int]:
        """The draft tokens of `forced`, a matcher's `find_jump_forward_string()`."""
        return list(self.encode(forced)) if forced else []


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
    ended: int = 0
    fed: int = 0
    padding: int = 0

    def add(self, g: Generated) -> None:
        self.calls += 1
        self.output_tokens += sum(len(t) for t in g.tokens)
        self.forward_passes += g.forward_passes
        self.drafted += g.drafted
        self.accepted += g.accepted
        self.ended += g.ended
        self.fed += g.fed
        self.padding += g.padding

    def as_dict(self) -> dict:
        return {**self.__dict__, "forced_share": (self.accepted + self.ended) / max(self.output_tokens, 1)}


@dataclass
class PrefixCache:
    """Keys/values of the prompt start shared by all rows; recomputed only when a batch does not start with it."""
    ids: tuple[int, ...] = ()
    kv: list = field(default_factory=list)  # per layer (keys, values), batch 1
    dtype: object = None  # the cache dtype they were stored in (attention.cache_dtype)
    hits: int = 0  # batches that reused the cached prefix
    misses: int = 0  # batches that computed it

    def for_batch(self, model, prompts: list[list[int]], device, dtype=None) -> int:
        """Length of the cached prefix to use for `prompts` (0: none), computing it if needed."""
        import torch

        n = common_prefix(prompts)
        n = min(n, min(len(p) for p in prompts) - 1)  # every row keeps at least one token of its own
        if n < 1:
            return 0
        if (self.ids and len(self.ids) <= n and tuple(prompts[0][:len(self.ids)]) == self.ids
                and self.dtype == dtype):
            self.hits += 1
            return len(self.ids)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([prompts[0][:n]], device=device), use_cache=True, logits_to_keep=1,
                        cache=_growing(dtype=dtype))
        self.misses += 1
        self.ids, self.dtype = tuple(prompts[0][:n]), dtype
        self.kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        return n

    def expand(self, batch: int, cache=None):
        """`cache` (by default a new growing one) holding the prefix for `batch` rows."""
        cache = cache if cache is not None else _growing(dtype=self.dtype)
        for i, (k, v) in enumerate(self.kv):
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)  # copied once, into room
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
    __slots__ = ("matcher", "tokens", "logprobs", "raw_logprobs", "pos", "draft", "masks", "done")

    def __init__(self, matcher, pos: int):
        self.matcher = matcher
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.raw_logprobs: list[float] = []  # at temperature 1
        self.pos = pos  # position id of the last token fed (the next one fed gets pos + 1 + accepted drafts)
        self.draft: list[int] = []
        self.masks = None  # bitmask rows: before each draft token, then after the last
        self.done = False


def greedy_generate(model, prompts: list[list[int]], *, max_new: int, eos_id: int, pad_id: int,
                    grammars: list | None = None, vocab_size: int = 0, drafter: Drafter | None = None,
                    prefix: PrefixCache | None = None, cost: PassCost | None = None,
                    temperature: float = 1.0) -> Generated:
    """Greedy continuation of each prompt, masked by its compiled grammar when `grammars` is given; jump-forward
    when a `drafter` is given. `prefix`, `cost`: the prefix cache and pass-cost model kept between calls.
    `temperature` scales the log-probabilities reported (the calibrated confidence), not the choice."""
    import time

    import torch

    from jsonextract.models.attention import cache_dtype

    if grammars is not None:
        import xgrammar as xgr
    device = next(model.parameters()).device
    B = len(prompts)
    rows = [_Row(xgr.GrammarMatcher(g) if grammars is not None else None, len(p) - 1)
            for p, g in zip(prompts, grammars or [None] * B)]
    jump_forward = drafter is not None and grammars is not None
    one_row = xgr.allocate_token_bitmask(1, vocab_size) if jump_forward else None  # forced_end's scratch mask
    cost = cost or PassCost.for_device(device)
    gen = Generated([r.tokens for r in rows], [r.logprobs for r in rows], raw_logprobs=[r.raw_logprobs for r in rows])
    head = VocabHead.for_model(model)
    kv_dtype = cache_dtype(model)  # bf16 where attention's products read it (attention.HALF), else as computed

    def forward(last_only: bool = False, **inputs):
        """(logits, or the final hidden states when `head` projects them itself; the cache) of one pass."""
        with torch.inference_mode():
            if head is not None:
                o = head.decoder(use_cache=True, **inputs)
                return (o.last_hidden_state[:, -1:] if last_only else o.last_hidden_state), o.cache
            o = model(use_cache=True, logits_to_keep=1 if last_only else 0, **inputs)
            return o.logits.float().cpu(), o.cache

    # Prompt: the shared prefix from the cache, then each row's rest, left-padded (padding = holes), by groups
    # of similar length; `alive` lists the rows in group order (the batch slots' order from here on).
    misses = prefix.misses if prefix is not None else 0
    P = prefix.for_batch(model, prompts, device, kv_dtype) if prefix is not None else 0
    S = max(len(p) for p in prompts) - P
    groups = length_groups([len(p) - P for p in prompts], cost.overhead_positions())
    slab = _Slab([len(g) for g in groups], [S + P - max(len(prompts[j]) for j in g) for g in groups],
                 P + S + max(64, (P + S) // 2), kv_dtype)  # room to grow as `GrowingLayer` leaves
    parts = []
    for gi, g in enumerate(groups):
        Sg = max(len(prompts[j]) for j in g) - P
        x = torch.full((len(g), Sg), pad_id, dtype=torch.long)
        m = torch.zeros((len(g), S), dtype=torch.long)  # the group's own padding, plus holes up to S
        for s, j in enumerate(g):
            x[s, Sg - len(prompts[j]) + P:] = torch.tensor(prompts[j][P:])
            m[s, S - len(prompts[j]) + P:] = 1
        own = torch.cat([torch.ones((len(g), P), dtype=torch.long), m[:, S - Sg:]], dim=1)  # the group's pass
        attn = torch.cat([m[:, :S - Sg], own], dim=1)  # in the joined cache: its holes, then the prefix and its own
        pos = (P + m[:, S - Sg:].cumsum(1) - 1).clamp(min=0)
        group_cache = slab.group(gi)
        last, _ = forward(input_ids=x.to(device), attention_mask=own.to(device), position_ids=pos.to(device),
                          cache=prefix.expand(len(g), group_cache) if P else group_cache, last_only=True)
        parts.append((last, attn))
        gen.forward_passes += 1
        gen.fed += len(g) * Sg
        gen.padding += len(g) * Sg - int(m.sum())
    gen.fed += P if prefix is not None and prefix.misses > misses else 0
    alive = [j for g in groups for j in g]  # row index of each batch slot
    out = torch.cat([lg for lg, _ in parts])  # per slot and position: logits, or hidden states for `head`
    attn = torch.cat([a for _, a in parts])
    cache = slab.joined(P + S)
    for r in rows:
        r.masks = _masks(r.matcher, [], vocab_size)[1] if grammars is not None else None

    while True:
        # 1. choose: check each slot's draft against the model's masked argmax at its positions of the last pass
        #    (chunk position i predicts draft token i; position n, the token after the draft), then take one token.
        sel = [(s, i) for s, j in enumerate(alive) for i in range(len(rows[j].draft) + 1)]
        flat = out[[s for s, _ in sel], [i for _, i in sel]]
        bitmask = torch.cat([rows[alive[s]].masks[i:i + 1] for s, i in sel]) if grammars is not None else None
        best, lp, lp1 = (head.choose(flat, bitmask, temperature) if head is not None
                         else masked_argmax(flat, bitmask, temperature))
        width = out.shape[1]
        k = 0
        for s, j in enumerate(alive):
            r = rows[j]
            n = len(r.draft)
            take = next((i for i, d in enumerate(r.draft) if best[k + i] != d), n)
            r.tokens += r.draft[:take]
            r.logprobs += lp[k:k + take]
            r.raw_logprobs += lp1[k:k + take]
            gen.accepted += take
            if take < n:  # rejected draft tokens: undo them in the matcher, mask their cache entries
                r.matcher.rollback(n - take)
                attn[s, attn.shape[1] - width + 1 + take:attn.shape[1] - width + 1 + n] = 0
            r.pos += 1 + take
            if len(r.tokens) < max_new:
                tok = best[k + take]
                r.tokens.append(tok)
                r.logprobs.append(lp[k + take])
                r.raw_logprobs.append(lp1[k + take])
                if r.matcher is not None and not r.matcher.accept_token(tok):
                    r.done = True  # the grammar allowed nothing: the output is cut here and fails validation
                if tok == eos_id or (r.matcher is not None and r.matcher.is_terminated()):
                    r.done = True
            r.done = r.done or len(r.tokens) >= max_new
            k += n + 1
            # 2. draft: the tokens the grammar forces next, fed with `tok` in the next pass; or, where they run to
            #    the end of the output, the row's last tokens, emitted without feeding anything.
            r.draft = []
            if not r.done and jump_forward:
                forced = r.matcher.find_jump_forward_string()
                end = forced_end(r.matcher, one_row, max_new - len(r.tokens), forced)
                if end is not None:
                    r.tokens += end
                    r.logprobs += [0.0] * len(end)  # the masked distribution's only token
                    r.raw_logprobs += [0.0] * len(end)
                    gen.ended += len(end)
                    r.done = True
                else:
                    r.draft = drafter(forced)[:max_new - len(r.tokens)]
            if not r.done and grammars is not None:
                r.draft, r.masks = _masks(r.matcher, r.draft, vocab_size)
        # 3. drop finished rows, feed the others: [last token] + draft, right-padded (padding = holes).
        keep = [s for s, j in enumerate(alive) if not rows[j].done]
        if not keep:
            break
        if len(keep) < len(alive):
            idx = torch.tensor(fill_holes(keep))
            cache.batch_select_indices(idx.to(device))
            attn = attn[idx]
            alive = [alive[s] for s in idx.tolist()]
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
        out, cache = forward(input_ids=x.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
                             cache=cache)
        cost.add(len(alive) * T, time.perf_counter() - t0)
        gen.forward_passes += 1
        gen.fed += len(alive) * T
        gen.padding += int((m == 0).sum())
    return gen


def fill_holes(keep: list[int]) -> list[int]:
    """The batch slots to keep (ascending), in the order that moves the fewest rows: slots below len(keep) stay
    where they are and the last kept slots move into the holes the finished rows leave. [0, 2, 3, 5] -> [0, 5, 2, 3]:
    only row 5 moves, where keeping the order would move 2, 3 and 5."""
    n, kept = len(keep), set(keep)
    tail = iter(s for s in keep if s >= n)
    return [s if s in kept else next(tail) for s in range(n)]


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


def masked_argmax(logits, bitmask, temperature: float = 1.0) -> tuple[list[int], list[float], list[float]]:
    """Per row: the argmax of the logits the grammar's `bitmask` allows (None: all), and its log-probability
    under the masked distribution at `temperature` and at 1 (max - logsumexp, without a vocabulary-sized
    log_softmax)."""
    if bitmask is not None:
        import xgrammar as xgr
        xgr.apply_token_bitmask_inplace(logits, bitmask)
    top = logits.max(-1).values
    return (logits.argmax(-1).tolist(), *log_probs(top, logits, temperature))


def log_probs(top, logits, temperature: float) -> tuple[list[float], list[float]]:
    """(log-probabilities of the `top` logits among each row of `logits` at `temperature`, and at 1). The argmax
    does not depend on the temperature; the confidence reported does (calibration.fit_temperature)."""
    import torch

    at_one = (top - torch.logsumexp(logits, -1)).tolist()
    if temperature == 1.0:
        return at_one, at_one
    return (top / temperature - torch.logsumexp(logits / temperature, -1)).tolist(), at_one


class VocabHead:
    """The output projection done by the loop, from the decoder's hidden states: only at the positions it reads
    (no padding, no rejected tail), and where the grammar allows few tokens, onto those alone. Inside a JSON
    answer most positions allow a handful of tokens (keys, enum values, punctuation: 70% of the positions read on
    SNIPS allowed at most 256 tokens, 91% on Restaurant-8k), yet the full projection onto 49,152 tokens costs a
    fifth of the model's matmul work per position and runs at half the speed of the decoder's matrices on a CPU
    (its 113 MB weight and output do not stay in cache: 36-40 GFLOP/s against 60-79 at 100 rows, one thread).
    The positions with few allowed tokens are projected together onto the union of their allowed tokens (one
    product: on SNIPS 77 such positions a pass shared 56 tokens; one small product per position had cost 0.3 s
    of a 10 s batch in Python and per-call overhead). The full projection, where needed, goes by vocabulary
    chunks that do stay in cache (1.4-1.5x; the same values, bit for bit). Allowed-token logits equal the full
    projection's up to float rounding (another summation order), as a different batch size gives already: the
    masked argmax is the same but for exact near-ties.

    Where the decoder's products run in bf16 on the CPU, the full projection does too (`_choose_half`): reading
    the head once per pass bounds it by memory (fp32 weights: 37 ms for 37 positions on Zen 5, 18% of a batch;
    bf16: 8 ms). The token is still fp32's: every token whose bf16 logit is within a rounding bound of the best
    one is recomputed in fp32 (6.8 per position on SNIPS) and the argmax taken over those.

    Only for models whose forward is exactly `lm_head(decoder(...))` with a plain bias-free Linear (no logit
    scaling or soft-capping), on a CPU, not FSDP-wrapped: elsewhere the model's own logits are used. A PEFT model
    whose adapters are all LoRA (Serve's unmerged adapters) is unwrapped: its decoder's layers apply the active
    adapter (or none, under `disable_adapter()`) themselves, so only an adapter on the lm_head itself keeps the
    model's logits."""

    PLAIN = ("llama", "mistral", "qwen2", "qwen3")  # model types whose logits are lm_head(final hidden state)
    FEW = 256  # allowed tokens up to which a position is projected onto those tokens alone
    UNION = 8192  # the most tokens the few-token positions of a pass are projected onto together
    CHUNK = 2048  # vocabulary rows per chunk of the full projection (its output stays in a core's L2 cache)

    def __init__(self, decoder, weight, half=None):
        import torch

        self.decoder = decoder
        # Logits in fp32 from a half-precision head (a model loaded or cast whole in bf16, e.g. `model.dtype=
        # bfloat16`; `model.inference_dtype=bfloat16` leaves the head in fp32): bf16 logits of magnitude 16-32 are
        # rounded to steps of 0.125, which ties or flips the argmax between close tokens. With an fp32 copy of the
        # head (113 MB for SmolLM2) the whole-bf16 model's outputs matched fp32's on 641 instead of 618 of 700
        # SNIPS test records (Restaurant-8k: 978 instead of 973 of 1000).
        self.weight = derived(weight, torch.float32, lambda w: w.detach().float())
        self.chunks = self.weight.split(self.CHUNK)
        self.half = None
        if half is not None:  # (bf16 chunks, per-token weight norms, the relative rounding of the weights)
            w16 = derived(weight, half, lambda w: w.detach().to(half))
            exact = derived(weight, "exact", lambda w: bool(torch.equal(w16.float(), self.weight)))
            norms = derived(weight, "norms", lambda w: self.weight.norm(dim=1))
            self.half = (w16.split(self.CHUNK), norms, 0.0 if exact else 2.0 ** -8)

    @classmethod
    def for_model(cls, model) -> "VocabHead | None":
        import torch

        from jsonextract.models.precision import matmul_dtype

        model = cls._unwrap_lora(model)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if (type(head) is not torch.nn.Linear or head.bias is not None or head.weight.device.type != "cpu"
                or not type(model).__module__.startswith("transformers.models.")
                or getattr(model.config, "model_type", None) not in cls.PLAIN):
            return None
        products = matmul_dtype(model)
        return cls(model.get_decoder(), head.weight, products if products == torch.bfloat16 else None)

    @staticmethod
    def _unwrap_lora(model):
        """The transformers model inside a PEFT model whose adapters are all LoRA (PeftModel.forward only passes the
        call on to it); any other model as it is."""
        configs = getattr(model, "peft_config", None)
        # activated LoRA (alora_invocation_tokens) is set up by PeftModel.forward's hooks from the input ids
        plain_lora = configs and all(getattr(c, "peft_type", None) == "LORA"
                                     and not getattr(c, "alora_invocation_tokens", None) for c in configs.values())
        if type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model") and plain_lora:
            return model.get_base_model()
        return model

    def project(self, hidden):
        """The fp32 logits of `hidden` rows over the whole vocabulary."""
        import torch
        import torch.nn.functional as F

        hidden = hidden.to(self.weight.dtype)
        return torch.cat([F.linear(hidden, w) for w in self.chunks], dim=1)

    def choose(self, hidden, bitmask, temperature: float = 1.0) -> tuple[list[int], list[float], list[float]]:
        """`masked_argmax` of the projected `hidden` rows [n, hidden size] under `bitmask` [n, words] (or None)."""
        import numpy as np
        import torch

        if bitmask is None:
            return self._choose_all(hidden, None, temperature)
        words = bitmask.numpy().view(np.uint32)
        allowed = np.bitwise_count(words).sum(1)
        few = (allowed > 0) & (allowed <= self.FEW)
        best, lp, lp1 = [0] * len(words), [0.0] * len(words), [0.0] * len(words)
        if few.any():
            rows = np.flatnonzero(few)
            sub = words[rows]
            union = np.bitwise_or.reduce(sub, axis=0)
            ids = np.flatnonzero(np.unpackbits(union.view(np.uint8), bitorder="little")[:self.weight.shape[0]])
            if len(ids) <= self.UNION:
                idx = torch.from_numpy(rows)
                lg = hidden[idx].to(self.weight.dtype) @ self.weight[torch.from_numpy(ids)].T  # [rows, union]
                member = (sub[:, ids >> 5] >> (ids & 31).astype(np.uint32)) & 1
                lg.masked_fill_(torch.from_numpy(member == 0), float("-inf"))
                top = lg.max(1)
                for r, t, v, v1 in zip(rows.tolist(), ids[top.indices.numpy()].tolist(),
                                       *log_probs(top.values, lg, temperature)):
                    best[r], lp[r], lp1[r] = t, v, v1
            else:  # positions whose allowed tokens differ widely: the full projection
                few[:] = False
        if not few.all():
            rows = np.flatnonzero(~few)
            idx = torch.from_numpy(rows)
            for r, t, v, v1 in zip(rows.tolist(), *self._choose_all(hidden[idx], bitmask[idx], temperature)):
                best[r], lp[r], lp1[r] = t, v, v1
        return best, lp, lp1

    def _choose_all(self, hidden, bitmask, temperature: float = 1.0) -> tuple[list[int], list[float], list[float]]:
        if self.half is None:
            return masked_argmax(self.project(hidden), bitmask, temperature)
        return self._choose_half(hidden, bitmask, temperature)

    def _choose_half(self, hidden, bitmask, temperature: float = 1.0) -> tuple[list[int], list[float], list[float]]:
        """The full projection in bf16, its argmax exact: a bf16 logit y of a token with weights w differs from the
        fp32 logit by at most 2^-8 |y| (the output's rounding; 2^-7 here, y being rounded itself) plus
        (2^-8 + weight rounding) |h| |w| (the input's and the weights' rounding, by Cauchy-Schwarz) plus fp32
        accumulation (below 2^-14 |h| |w| for these widths). A token can be the argmax only if its upper bound
        reaches the best lower bound; every token that passes a looser test of that (one comparison per logit,
        with the largest |w|) is recomputed in fp32, and the argmax taken. The log-probability's normaliser sums
        the recomputed logits and the other tokens' bf16 ones: against the fp32 projection's, log-probabilities
        moved by 0.0002 on average and at most 0.004 (440 free-text positions of SNIPS test rows, tokens
        identical). 37 positions over SmolLM2's vocabulary: 10.5 ms, against 29 ms in fp32 (one thread, Zen 5)."""
        import numpy as np
        import torch
        import torch.nn.functional as F

        chunks, norms, weight_rounding = self.half
        h16 = hidden.to(chunks[0].dtype)
        lg = torch.cat([F.linear(h16, w) for w in chunks], dim=1).float()
        if bitmask is not None:
            import xgrammar as xgr
            xgr.apply_token_bitmask_inplace(lg, bitmask)
        u = 2.0 ** -7
        slack = hidden.float().norm(dim=1) * (2.0 ** -8 + weight_rounding + 2.0 ** -14) * norms.max()
        best = lg.amax(1)
        need = best - u * best.abs() - 2 * slack  # below the best token's lower bound, less the most a bound adds
        cut = torch.where(need >= 0, need / (1 + u), need / (1 - u))  # y + u|y| >= need
        cut = torch.where(torch.isfinite(best), cut, float("inf"))  # a row with no allowed token: no candidate
        flat = np.flatnonzero(lg.numpy() >= cut.numpy()[:, None])  # (numpy's: 4x torch.nonzero's speed here)
        rows, toks = (torch.from_numpy(a) for a in np.divmod(flat, lg.shape[1]))
        exact = (self.weight[toks] * hidden[rows].to(self.weight.dtype)).sum(1)
        lg[rows, toks] = exact
        # The argmax is among the candidates (row-major, so by row, then token): the first of the best, as argmax.
        tokens, values = [0] * len(lg), [float("-inf")] * len(lg)
        for r, t, v in zip(rows.tolist(), toks.tolist(), exact.tolist()):
            if v > values[r]:
                tokens[r], values[r] = t, v
        return (tokens, *log_probs(torch.tensor(values), lg, temperature))


def derived(weight, key, make):
    """`make(weight)`, made once per weight and `key` and kept on the weight tensor itself, so it lives as long as
    the model (SmolLM2's fp32 head copy: 27 ms; its bf16 copy); remade when the weight's storage or version
    changes (edits through `.data` are not seen: no inference path edits the head, which is cast after any
    merge)."""
    stamp = (weight._version, weight.data_ptr())
    cache = weight.__dict__.setdefault("_jsonextract_derived", {})
    if key not in cache or cache[key][0] != stamp:
        cache[key] = (stamp, make(weight))
    return cache[key][1]


class _Slab:
    """The prompt groups' key/value caches as one buffer pair per layer, [rows, heads, width, head_dim], the groups'
    rows one after another: group g's cache writes in place from position `holes[g]` on (its masked holes, zeros,
    come first: attention reads keys by mask, not by place), so the groups' caches are already the joined cache of
    all rows. Joining them by concatenation instead copied every layer's cache three times into fresh memory: 9% of
    a batch of 256 SNIPS rows (one thread, Zen 5), most of it the first touch of that memory."""

    def __init__(self, sizes: list[int], holes: list[int], width: int, dtype=None):
        self.sizes, self.holes, self.width, self.dtype = sizes, holes, width, dtype
        self.starts = [sum(sizes[:g]) for g in range(len(sizes))]
        self.buffers = []  # per layer (keys, values), allocated at the layer's first write

    def layer(self, i: int, like):
        import torch

        if i == len(self.buffers):
            shape = (sum(self.sizes), like.shape[1], self.width, like.shape[3])
            bufs = tuple(like.new_empty(shape, dtype=self.dtype or like.dtype) for _ in range(2))
            for start, n, h in zip(self.starts, self.sizes, self.holes):  # never written, but read: 0 * NaN = NaN
                for b in bufs:
                    b[start:start + n, :, :h].zero_()
            self.buffers.append(bufs)
        return self.buffers[i]

    def group(self, g: int):
        """Group g's cache: growing layers over its rows of the buffers, from its first position after the holes."""
        from transformers.cache_utils import Cache

        rows, h = slice(self.starts[g], self.starts[g] + self.sizes[g]), self.holes[g]
        index = itertools.count()  # Cache makes its layers in order, one per layer index
        return Cache(layer_class_to_replicate=lambda: _growing_layer_class(self.dtype)(
            room=lambda like, i=next(index): tuple(b[rows, :, h:] for b in self.layer(i, like))))

    def joined(self, length: int):
        """The cache of every row: the buffers' first `length` positions, growing in place from there."""
        from transformers.cache_utils import Cache

        layers = []
        for k, v in self.buffers:
            layer = _growing_layer_class(self.dtype)()
            layer.seed(k, v, length)
            layers.append(layer)
        return Cache(layers=layers)


def _growing(dtype=None):
    """An empty cache whose layers grow in place (`GrowingLayer`), storing keys and values in `dtype` (None: as
    the layers compute them)."""
    from transformers.cache_utils import Cache

    return Cache(layer_class_to_replicate=_growing_layer_class(dtype))


@functools.lru_cache(maxsize=4)
def _growing_layer_class(dtype=None):
    import torch
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """Keys and values in buffers with room to grow along the sequence: a pass writes its positions in place
        and the layer hands out views, where transformers' DynamicLayer concatenates, copying the whole cache of
        every layer on every pass (6-9% of a CPU decode's operator time at batch 100). With a `store_dtype`, each
        pass's new positions are rounded to it on the way in (a bf16 cache for attention.HALF)."""
        store_dtype = dtype

        def __init__(self, room=None):
            super().__init__()
            self._room = room  # called with the first keys written: the (keys, values) buffers to grow in

        def seed(self, k, v, length: int) -> None:
            """Grow in the buffers `k` and `v`, whose first `length` positions are filled."""
            self.device, self.is_initialized, self._room = k.device, True, None
            self._k, self._v = k, v
            self.keys, self.values = k[:, :, :length], v[:, :, :length]

        def update(self, key_states, value_states, *args, **kwargs):
            if self.store_dtype is not None:
                key_states, value_states = key_states.to(self.store_dtype), value_states.to(self.store_dtype)
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._k, self._v = self._room(key_states) if self._room is not None else (None, None)
            n, t = self.get_seq_length(), key_states.shape[-2]
            with torch.inference_mode():  # an inference-only cache: its buffers may be made in or out of it
                if self._k is None or n + t > self._k.shape[-2]:
                    self._k, self._v = (_with_room(old, new, n, n + t + max(64, n // 2))
                                        for old, new in ((self.keys, key_states), (self.values, value_states)))
                self._k[:, :, n:n + t] = key_states
                self._v[:, :, n:n + t] = value_states
            self.keys, self.values = self._k[:, :, :n + t], self._v[:, :, :n + t]
            return self.keys, self.values

        def batch_select_indices(self, indices) -> None:
            n = self.get_seq_length()
            if not n:
                return
            dst = torch.nonzero(indices != torch.arange(len(indices), device=indices.device)).flatten()
            with torch.inference_mode():
                if len(dst) and int(indices[dst].min()) >= len(indices):  # `fill_holes` order: move only those
                    for buf in (self._k, self._v):
                        buf[dst, :, :n] = buf[indices[dst], :, :n]
                    self._k, self._v = self._k[:len(indices)], self._v[:len(indices)]
                else:
                    self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    return GrowingLayer


def _with_room(old, new, n: int, capacity: int):
    """A [batch, heads, capacity, dim] buffer shaped like `new`, holding the first `n` positions of `old`."""
    buf = new.new_empty(*new.shape[:2], capacity, new.shape[3])
    if n:
        buf[:, :, :n] = old[:, :, :n]
    return buf


def forced_end(matcher, bitmask, limit: int, forced: str | None = None) -> list[int] | None:
    """The output's last tokens when the grammar allows exactly one token at each step from here to the stop token
    (a JSON answer's closing braces, then eos), at most `limit` of them; else None. The matcher ends having
    accepted them. Step-by-step decoding emits the same tokens, each the masked argmax over a single allowed token
    (log-probability 0), but feeds each one to the model first, and the token before them too: on Restaurant-8k
    the closing brace and eos after the last value, two of the 40-odd positions a row computes. Unlike a draft,
    these need no check by the model: nothing after them is decoded. `bitmask`: a one-row xgrammar bitmask to
    fill (scratch); `forced`: the matcher's `find_jump_forward_string()`, when the caller has it already."""
    import numpy as np

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

    def __init__(self, compiled: list | None, batch: int, vocab_size: int, temperature: float = 1.0):
        self.matchers = None
        self.temperature = temperature
        self.raw: list = []
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
        at_t, at_one = log_probs(x.max(-1).values, x, self.temperature)
        self.steps.append(at_t)
        self.raw.append(at_one)
        return scores


def reference_generate(model, prompts: list[list[int]], *, max_new: int, eos_id: int, pad_id: int,
                       grammars: list | None = None, vocab_size: int = 0, temperature: float = 1.0) -> Generated:
    """The same greedy decoding through transformers' `generate()` with a grammar logits processor: one forward
    pass per token, every row until the longest ends. For architectures whose cache the loop above does not
    handle (recurrent or sliding-window state), and as the baseline the benchmark measures against."""
    import torch

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
