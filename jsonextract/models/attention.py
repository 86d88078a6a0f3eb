"""Attention for inference over a grouped-query (GQA) model's key/value cache, without copying the cache.

transformers' `sdpa` attention gives every query head its own copy of the cached keys and values (`repeat_kv`)
whenever a pass feeds more than one position and a mask is given; it avoids the copy only for one-position passes.
The decoding loop's passes are mostly of several positions (a sampled token plus its jump-forward draft, prompts in
padded groups), so each layer of each pass copied the whole cache `num_key_value_groups` times, and attention then
read all the copies. Here the query heads that share a key/value head are laid along the query length instead
(batch, kv_heads, groups x positions, head_dim) and the mask repeated to match: each (row, head, position) attends
to the same keys with the same mask as before, so the outputs are those of `sdpa` (tests compare them).

Where the decoder's matrix products run in bf16 on a CPU (`model.inference_dtype`), attention's own two products
(queries x keys, probabilities x values) run in bf16 too, over a key/value cache the decoding loop stores in bf16
(`HALF`, `cache_dtype`); the mask and the softmax stay fp32. torch's flash kernel gains nothing from bf16 inputs
on a CPU at these shapes (it computes the scores in fp32 blocks), while two batched bf16 matrix products do
(figures in docs/experiments.md).
"""
from __future__ import annotations

import functools

from jsonextract.lazy import lazy
from jsonextract.models.precision import matmul_dtype

hf_sdpa = lazy("transformers.integrations.sdpa_attention")
masking_utils = lazy("transformers.masking_utils")
torch = lazy("torch")
transformers = lazy("transformers")

NAME = "sdpa_packed_gqa"  # packed query heads, torch's SDPA in the cache's dtype
HALF = "packed_gqa_half_products"  # the same, with attention's products in a half-precision cache's dtype on a CPU
HALF_DTYPES = ("bfloat16", "float16")
SCORES_PER_CHUNK = 1 << 22  # fp32 scores held at once (16 MB): long prompts are attended in batch slices


def packed_gqa_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: (module, query (B, H, T, D), key and value (B, KV, L, D), mask
    (B, 1, T, L) or None, ...) -> ((B, T, H, D), None). Cases it does not pack go to transformers' own `sdpa`."""
    if key.dtype != query.dtype:  # a half-precision cache outside `packed_gqa_half_products`' cases
        key, value = key.to(query.dtype), value.to(query.dtype)
    groups = getattr(module, "num_key_value_groups", 1)
    B, H, T, D = query.shape
    if (groups == 1 or T == 1 or attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return hf_sdpa.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # Head h reads key/value head h // groups (repeat_kv's order): heads (kv, g) -> rows g * T + t of head kv.
    q = query.reshape(B, H // groups, groups * T, D)
    mask = attention_mask.repeat(1, 1, groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.view(out.shape[0], H, T, D).transpose(1, 2).contiguous(), None


def packed_gqa_half_products(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """`packed_gqa_sdpa`, with both matrix products in the dtype of a half-precision key/value cache on a CPU: the
    queries are scaled in their own dtype and rounded once, the scores come out of the product in the cache's dtype
    and are masked and soft-maxed in fp32, the probabilities are rounded for the product with the values. Anything
    else (an fp32 cache, e.g. generate()'s, a GPU, dropout, position bias) goes to `packed_gqa_sdpa`."""
    half = str(key.dtype).removeprefix("torch.") in HALF_DTYPES and key.device.type == "cpu"
    mask = attention_mask
    if (not half or dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or (mask is not None and (mask.dim() != 4 or mask.shape[1] != 1))):
        return packed_gqa_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                               is_causal=is_causal, **kwargs)
    B, H, T, D = query.shape
    KV, L = key.shape[1], key.shape[2]
    G = H // KV
    if mask is None and T > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        # transformers drops an all-visible causal mask for sdpa's is_causal: the T queries are the last T keys
        mask = torch.ones(T, L, dtype=torch.bool, device=query.device).tril(L - T).view(1, 1, T, L)
    q = (query * (scaling if scaling is not None else D ** -0.5)).to(key.dtype).reshape(B, KV, G * T, D)
    outs, step = [], max(SCORES_PER_CHUNK // (H * T * L), 1)
    for b in range(0, B, step):
        rows = slice(b, b + step)
        # The decoding loop's cache hands out views into buffers with room to grow; a batched bf16 product copies
        # such a strided operand itself, transposed for the keys, more slowly than one contiguous copy first.
        k, v = key[rows].contiguous(), value[rows].contiguous()
        s = torch.matmul(q[rows], k.transpose(-1, -2)).float().view(-1, KV, G, T, L)
        if mask is not None:
            m = (mask if mask.shape[0] == 1 else mask[rows]).unsqueeze(2)  # (b, 1, 1, T, L): every head, every group
            if m.dtype == torch.bool:
                # the lowest finite value, not -inf: a fully masked row (left padding) stays finite instead of NaN
                s.masked_fill_(~m, torch.finfo(s.dtype).min)
            else:
                s += m
        p = torch.softmax(s, dim=-1).to(key.dtype).view(-1, KV, G * T, L)
        outs.append(torch.matmul(p, v))
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.view(B, H, T, D).transpose(1, 2).contiguous().to(query.dtype), None


@functools.cache
def _register() -> None:
    for name, fn in ((NAME, packed_gqa_sdpa), (HALF, packed_gqa_half_products)):
        transformers.AttentionInterface.register(name, fn)
        masking_utils.AttentionMaskInterface.register(name, masking_utils.sdpa_mask)  # the same boolean masks as `sdpa`


def set_inference_attention(model, setting: str) -> bool:
    """Apply `model.inference_attention`: `auto` switches a model on transformers' `sdpa` with grouped query heads to
    the packed attention above, with its products in bf16 where the decoder's matrix products run in a half dtype on
    a CPU (`HALF`); `packed` to the packed attention in the cache's dtype; `sdpa`, models on another implementation
    (eager, flash_attention_2) stay as they are, and so do models without GQA unless their products are lowered. Returns whether it switched. Call it after
    any save_pretrained: the names are registered in this process only."""
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if setting == "sdpa" or cfg._attn_implementation != "sdpa" or not heads:
        return False
    half = setting == "auto" and _half_products_on_cpu(model)
    if kv_heads == heads and not half:  # no query heads to pack, no products to lower
        return False
    _register()
    model.set_attn_implementation(HALF if half else NAME)
    return True


def _half_products_on_cpu(model) -> bool:
    return (next(model.parameters()).device.type == "cpu"
            and str(matmul_dtype(model)).removeprefix("torch.") in HALF_DTYPES)


def cache_dtype(model):
    """The dtype the decoding loop stores keys and values in: the decoder's matrix-product dtype under `HALF`
    attention (what its products read), else None (as the layers compute them)."""
    if getattr(model.config, "_attn_implementation", None) != HALF:
        return None
    return matmul_dtype(model)
