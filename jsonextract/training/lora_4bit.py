"""LoRA over a 4-bit base projection as one autograd function (parallel.lora_kernel=fused), for training.

peft's layer computes `base(x).clone() + B(A(dropout(x))) * scale` through bitsandbytes' own autograd function,
which dequantises the NF4 weight into the model's dtype (fp32 on CPU workers) and lets autocast cast it, and the
activations, to bf16 again for the product; the clone and the second input cast are there for peft's generality.
`LoraLinear4bitFunction` dequantises straight into the product's dtype, casts the input once for both products,
and in backward computes only the gradients autograd asks for (the first layer's input needs none). The weight is
dequantised again in backward instead of being kept: keeping it would hold a full-precision copy of every frozen
layer for the whole step, which is what 4-bit storage is there to avoid.

The output stays in the product's dtype (bf16 under autocast), where peft's layer casts it back to the input's:
every consumer of a projection either multiplies again (attention, the MLP's down projection: autocast would cast
it to bf16 anyway) or adds it to the fp32 residual stream, which promotes it. In fp32 the loss and gradients equal
peft's to rounding (a test checks it); under bf16 autocast both round to bf16 at the same products. Layers in a
state this function does not cover (adapters disabled or merged, several active adapters, DoRA and other variants,
per-row adapter names) fall back to peft's forward.
"""
from __future__ import annotations

import torch
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

from jsonextract.training.loss import compute_dtype


def dequantize(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight of a bitsandbytes 4-bit parameter in `dtype` (double-quantised scales included)."""
    absmax = state.absmax
    if state.nested:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            state.absmax, state.state2.absmax, state.state2.code, state.state2.blocksize, torch.float32) + state.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(packed.view(-1, 1), absmax, state.blocksize,
                                                          state.quant_type, state.shape, dtype)


class LoraLinear4bitFunction(torch.autograd.Function):
    """y = x W^T (+ bias) + scale * dropout(x) A^T B^T, products and y in `dtype`.

    `xd` is dropout(x) computed outside (autograd differentiates the dropout); it is `x` itself when there is no
    dropout, and then one cast serves both products and their gradients add into one."""

    @staticmethod
    def forward(ctx, x, xd, a, b, packed, state, bias, scale: float, dtype: torch.dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        xd2 = x2 if xd is x else xd.reshape(-1, shape[-1]).to(dtype)
        a2, b2 = a.to(dtype), b.to(dtype)
        h = xd2 @ a2.t()
        y = torch.addmm(x2 @ dequantize(packed, state, dtype).t(), h, b2.t(), alpha=scale)
        if bias is not None:  # frozen, like the weight
            y.add_(bias.to(dtype))
        ctx.save_for_backward(xd2, h, a2, b2)
        # The packed weight is kept as an attribute, as bitsandbytes' own function does: under FSDP2 it is the
        # unsharded parameter, freed after forward and gathered again into the same tensor before backward.
        ctx.packed, ctx.state, ctx.scale, ctx.same = packed, state, scale, xd is x
        ctx.x_dtype, ctx.shape, ctx.param_dtypes = x.dtype, shape, (a.dtype, b.dtype)
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        xd2, h, a2, b2 = ctx.saved_tensors
        need_x, need_xd, need_a, need_b = ctx.needs_input_grad[:4]
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(h.dtype)
        gh = (g @ b2).mul_(ctx.scale) if (need_x or need_xd or need_a) else None
        gx = gxd = None
        if need_x:
            gx = g @ dequantize(ctx.packed, ctx.state, h.dtype)
            if ctx.same:
                gx.addmm_(gh, a2)
            gx = gx.to(ctx.x_dtype).reshape(ctx.shape)
        if need_xd and not ctx.same:
            gxd = (gh @ a2).to(ctx.x_dtype).reshape(ctx.shape)
        ga = (gh.t() @ xd2).to(ctx.param_dtypes[0]) if need_a else None
        gb = (g.t() @ h).mul_(ctx.scale).to(ctx.param_dtypes[1]) if need_b else None
        return gx, gxd, ga, gb, None, None, None, None, None


class FusedLoraLinear4bit(PeftLinear4bit):
    """peft's LoRA layer over a bitsandbytes 4-bit Linear whose training forward is LoraLinear4bitFunction."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = [n for n in self.active_adapters if n in self.lora_A]
        bias = self.base_layer.bias
        if (self.disable_adapters or self.merged or args or kwargs or len(names) != 1
                or names[0] in self.lora_variant or (bias is not None and bias.requires_grad)):
            return super().forward(x, *args, **kwargs)
        name, base = names[0], self.base_layer
        fix_4bit_weight_quant_state_from_module(base)
        return LoraLinear4bitFunction.apply(x, self.lora_dropout[name](x), self.lora_A[name].weight,
                                            self.lora_B[name].weight, base.weight, base.weight.quant_state,
                                            bias, self.scaling[name], compute_dtype(x))


def fuse_lora_4bit(model: torch.nn.Module) -> int:
    """Give every peft LoRA layer over a 4-bit base the fused training forward; returns how many. The layers keep
    their parameters, names and peft type (saving, merging and loading adapters see no difference)."""
    n = 0
    for m in model.modules():
        if type(m) is PeftLinear4bit:
            m.__class__ = FusedLoraLinear4bit
            n += 1
    return n
