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
- Prompts in length groups: one left-padded prompt pass computes every row at the longest row's length, much of
  it padding. Rows are sorted by length and split where the
  padding saved is worth a pass's overhead (`PassCost`); each group writes its cache in place into one buffer
  per layer for all rows, behind masked holes up to a common length (`Slab`), and all rows decode together.
- On a CPU the loop projects the final hidden states onto the vocabulary itself (`VocabHead`): only where it
  reads a token, and onto the grammar's allowed tokens where they are few. The key/value cache grows in place
  (`growing_cache`) and rows that finish are replaced by the last rows (`fill_holes`), so a pass copies neither the
  whole cache nor every remaining row.
"""
from __future__ import annotations

import time

from jsonextract.decoding.generated import Generated
from jsonextract.decoding.grammar import Drafter, draft_masks, forced_end, masked_argmax
from jsonextract.decoding.kv_cache import PrefixCache, Slab
from jsonextract.decoding.scheduling import PassCost, fill_holes, length_groups
from jsonextract.decoding.vocab_head import VocabHead
from jsonextract.lazy import lazy
from jsonextract.models.attention import cache_dtype

torch = lazy("torch")
xgr = lazy("xgrammar")


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
    slab = Slab([len(g) for g in groups], [S + P - max(len(prompts[j]) for j in g) for g in groups],
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
        r.masks = draft_masks(r.matcher, [], vocab_size)[1] if grammars is not None else None

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
                r.draft, r.masks = draft_masks(r.matcher, r.draft, vocab_size)
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
