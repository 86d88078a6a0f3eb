"""The output projection done by the loop itself (`VocabHead`), and the per-weight cache of tensors derived from a
weight (`derived`)."""
from __future__ import annotations

from jsonextract.decoding.grammar import log_probs, masked_argmax
from jsonextract.lazy import lazy
from jsonextract.models.precision import matmul_dtype

F = lazy("torch.nn.functional")
np = lazy("numpy")
torch = lazy("torch")
xgr = lazy("xgrammar")


class VocabHead:
    """The output projection done by the loop, from the decoder's hidden states: only at the positions it reads
    (no padding, no rejected tail), and where the grammar allows few tokens, onto those alone. Inside a JSON
    answer most positions allow a handful of tokens (keys, enum values, punctuation), yet the full projection onto
    a large vocabulary is a big share of a small model's matmul work per position, and slow on a CPU (its weight
    and output do not stay in cache). The positions with few allowed tokens are projected together onto the union
    of their allowed tokens, in one product (one small product per position costs more in Python and per-call
    overhead than it saves). The full projection, where needed, goes by vocabulary chunks that do stay in cache
    (the same values, bit for bit). Allowed-token logits equal the full
    projection's up to float rounding (another summation order), as a different batch size gives already: the
    masked argmax is the same but for exact near-ties.

    Where the decoder's products run in bf16 on the CPU, the full projection does too (`_choose_half`): reading
    the head once per pass bounds it by memory, and bf16 halves what is read. The token is still fp32's: every
    token whose bf16 logit is within a rounding bound of the best one is recomputed in fp32 (a few per position)
    and the argmax taken over those. Figures for each of these: docs/decoding.md and docs/experiments.md.

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
        self.decoder = decoder
        # Logits in fp32 from a half-precision head (a model loaded or cast whole in bf16, e.g. `model.dtype=
        # bfloat16`; `model.inference_dtype=bfloat16` leaves the head in fp32): bf16 logits of magnitude 16-32 are
        # rounded to steps of 0.125, which ties or flips the argmax between close tokens; an fp32 copy of the head
        # brings the whole-bf16 model's outputs closer to fp32's.
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
        hidden = hidden.to(self.weight.dtype)
        return torch.cat([F.linear(hidden, w) for w in self.chunks], dim=1)

    def choose(self, hidden, bitmask, temperature: float = 1.0) -> tuple[list[int], list[float], list[float]]:
        """`masked_argmax` of the projected `hidden` rows [n, hidden size] under `bitmask` [n, words] (or None)."""
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
        the recomputed logits and the other tokens' bf16 ones, so log-probabilities move by a little against the
        fp32 projection's while the tokens stay identical (tests/unit/test_decoding.py checks both)."""
        chunks, norms, weight_rounding = self.half
        h16 = hidden.to(chunks[0].dtype)
        lg = torch.cat([F.linear(h16, w) for w in chunks], dim=1).float()
        if bitmask is not None:
            xgr.apply_token_bitmask_inplace(lg, bitmask)
        u = 2.0 ** -7
        slack = hidden.float().norm(dim=1) * (2.0 ** -8 + weight_rounding + 2.0 ** -14) * norms.max()
        best = lg.amax(1)
        need = best - u * best.abs() - 2 * slack  # below the best token's lower bound, less the most a bound adds
        cut = torch.where(need >= 0, need / (1 + u), need / (1 - u))  # y + u|y| >= need
        cut = torch.where(torch.isfinite(best), cut, float("inf"))  # a row with no allowed token: no candidate
        flat = np.flatnonzero(lg.numpy() >= cut.numpy()[:, None])  # (numpy's is faster than torch.nonzero here)
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
    the model (the fp32 or bf16 copy of a head is made once, not per batch); remade when the weight's storage or version
    changes (edits through `.data` are not seen: no inference path edits the head, which is cast after any
    merge)."""
    stamp = (weight._version, weight.data_ptr())
    cache = weight.__dict__.setdefault("_jsonextract_derived", {})
    if key not in cache or cache[key][0] != stamp:
        cache[key] = (stamp, make(weight))
    return cache[key][1]
