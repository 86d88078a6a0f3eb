"""Inference with the decoder's matrix products in a half-precision dtype (bf16 where the CPU runs bf16 products
faster, `hardware.fast_bf16`) and the residual stream in the model's own dtype (fp32 on CPUs).

Casting the whole model to bf16 would also round the residual stream, the norms' inputs, attention and the KV
cache to bf16 at every layer, and change more outputs. Here each layer's MLP runs in bf16 as a whole (its wide
intermediate never goes back to fp32) and the attention projections are cast one by one, so only the products'
inputs are rounded. How many outputs each choice changed, and at what speed: docs/experiments.md.
"""
from __future__ import annotations

import functools

from jsonextract.lazy import lazy

torch = lazy("torch")


def _cast_input(dtype, module, args, kwargs):
    if args:
        return (args[0].to(dtype), *args[1:]), kwargs
    first = next(iter(kwargs))  # called with keywords only
    return args, {**kwargs, first: kwargs[first].to(dtype)}


def _cast_output(dtype, module, args, kwargs, output):
    if isinstance(output, tuple):  # e.g. a mixture-of-experts block's (hidden states, router logits)
        return (output[0].to(dtype), *output[1:])
    return output.to(dtype)


def _run_in(module, dtype, outer) -> None:
    """`module`'s weights in `dtype`; its first input is cast to `dtype` on the way in and its output to `outer` on
    the way out, so its callers see no change of dtype."""
    module.to(dtype)
    module.register_forward_pre_hook(functools.partial(_cast_input, dtype), with_kwargs=True)
    module.register_forward_hook(functools.partial(_cast_output, outer), with_kwargs=True)


def lower_matmul_precision(model, dtype) -> int:
    """Run the matrix products of `model`'s decoder in `dtype`, the rest in the model's dtype. Each decoder layer's
    MLP (`layer.mlp`: Llama, Mistral, Qwen) runs in `dtype` between its input and its output; every other linear
    layer of the decoder (the attention projections; all of them in models without a `mlp`) gets its weights in
    `dtype` and casts its input and output. Embeddings, norms, rotary embeddings, attention, the KV cache and the
    output head stay as they are. Unmerged LoRA adapters attached later keep their own dtype (PEFT calls the
    wrapped linear layer, whose hooks stay with it). Returns the number of modules switched; a second call
    switches none."""
    outer = model.get_input_embeddings().weight.dtype  # the residual stream's
    decoder = model.get_decoder()
    done = 0
    whole = [layer.mlp for layer in getattr(decoder, "layers", []) if isinstance(getattr(layer, "mlp", None),
                                                                                 torch.nn.Module)]
    inside = {id(m) for mlp in whole for m in mlp.modules()}
    for module in [*whole, *(m for m in decoder.modules() if isinstance(m, torch.nn.Linear) and id(m) not in inside)]:
        weight = next(module.parameters(), None)
        if weight is None or weight.dtype == dtype:  # already switched (or nothing to switch)
            continue
        _run_in(module, dtype, outer)
        done += 1
    return done


def matmul_dtype(model):
    """The dtype of the decoder's first linear layer: what its matrix products run in."""
    return next(m.weight.dtype for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear))
