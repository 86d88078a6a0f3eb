"""Attention for inference over a grouped-query (GQA) model's key/value cache, without copying the cache.

transformers' `sdpa` attention gives every query head its own copy of the cached keys and values (`repeat_kv`)
whenever a pass feeds more than one position and a mask is given; it avoids the copy only for one-position passes.
The decoding loop's passes are mostly of several positions (a sampled token plus its jump-forward draft, prompts in
padded groups), so each layer of each pass copied the whole cache `num_key_value_groups` times, and attention then
read all the copies: on SmolLM2-135M (9 query heads over 3 key/value heads) at batch 256 on a CPU, the copies were
6% of a batch's time. Here the query heads that share a key/value head are laid along the query length instead
(batch, kv_heads, groups x positions, head_dim) and the mask repeated to match: each (row, head, position) attends
to the same keys with the same mask as before, so the outputs are those of `sdpa` (tests compare them).
"""
from __future__ import annotations

import functools

NAME = "sdpa_packed_gqa"


def packed_gqa_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: (module, query (B, H, T, D), key and value (B, KV, L, D), mask
    (B, 1, T, L) or None, ...) -> ((B, T, H, D), None). Cases it does not pack go to transformers' own `sdpa`."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    B, H, T, D = query.shape
    if (groups == 1 or T == 1 or attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # Head h reads key/value head h // groups (repeat_kv's order): heads (kv, g) -> rows g * T + t of head kv.
    q = query.reshape(B, H // groups, groups * T, D)
    mask = attention_mask.repeat(1, 1, groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.view(out.shape[0], H, T, D).transpose(1, 2).contiguous(), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_gqa_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the same boolean masks as `sdpa`


def set_inference_attention(model, setting: str) -> bool:
    """Apply `model.inference_attention`: `auto` switches a model on transformers' `sdpa` with grouped query heads to
    the packed attention above; `sdpa`, models on another implementation (eager, flash_attention_2) and models
    without GQA stay as they are. Returns whether it switched. Call it after any save_pretrained: the name is
    registered in this process only."""
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if setting != "auto" or cfg._attn_implementation != "sdpa" or not heads or kv_heads == heads:
        return False
    _register()
    model.set_attn_implementation(NAME)
    return True
