"""What this machine can do for a model's matrix products: whether bf16 products pay here (the one rule training's
autocast and inference's dtype both follow), and the roofline probe the decoding and training benchmarks compare
their throughput with.

A pass multiplies `rows` random rows through matrices of the model's shapes (every Linear of every decoder
layer, then the output projection; no attention, norms or Python), the weights distinct tensors so each is read
from memory as the model's are. The first pass is a warm-up and is not timed: it pays for kernel selection and
code generation at each new shape (oneDNN builds a bf16 kernel per shape; one cold 32-row pass of SmolLM2's
shapes took over a second where a warm one takes milliseconds), which a model running for minutes pays once.
The rate is the best of the timed passes that fit in `budget_s` (at least one), so a CPU that emulates bf16
(hundreds of times slower) costs two slow passes, not six. A slow first pass alone says nothing: a cold pass can
take seconds where the warm ones take milliseconds.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from jsonextract.lazy import lazy

torch = lazy("torch")


# bf16 wins where it is measured at least this much faster than fp32 at decoding's shapes; CPUs with native bf16
# units lie far above it and CPUs that emulate bf16 far below (docs/experiments.md has the ratios).
BF16_MIN_SPEEDUP = 1.5


@functools.cache
def bf16_matmul_speedup() -> float:
    """How many times faster than fp32 this CPU multiplies decoding-shaped matrices in bf16 (a 64-row activation
    by a 576x1536 weight, SmolLM2's MLP; at torch's thread count; once a process)."""
    # Measured, not read from CPU flags: which kernel a bf16 product gets depends on the CPU, on oneDNN's
    # dispatch and on the environment (ONEDNN_MAX_CPU_ISA can hold an AMX CPU below its bf16 units), and the
    # flags do not tell the speed. The two dtypes are timed in turn and each keeps its best: a burst of load from
    # another process slows both alike or is dropped by the minimum, where timing one dtype after the other
    # could catch the burst in one of them only.
    a32, b32 = torch.randn(64, 576), torch.randn(576, 1536)
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def timed(a, b) -> float:
        start = time.perf_counter()
        a @ b
        return time.perf_counter() - start

    with torch.inference_mode():
        a32 @ b32, a16 @ b16  # oneDNN builds each kernel on its first call
        fp32, bf16 = float("inf"), float("inf")
        for _ in range(8):
            fp32, bf16 = min(fp32, timed(a32, b32)), min(bf16, timed(a16, b16))
            if bf16 > 20 * fp32:  # emulated bf16 (oneDNN's reference kernel): far too slow to win, stop here
                break
    return fp32 / bf16


def fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices at least BF16_MIN_SPEEDUP times as fast as fp32 (measured once)."""
    return bf16_matmul_speedup() >= BF16_MIN_SPEEDUP


def matmul_shapes(model_dir: str) -> list[tuple[int, int]]:
    """(in, out) of every matrix a token passes through: each layer's q, k, v, o, gate, up, down, then lm_head."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, i, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = h * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // cfg["num_attention_heads"]
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)] * L + [(h, v)]


def matmul_params(model_dir: str) -> int:
    """Weights a token passes through in matrix products: every Linear of the decoder plus the output projection."""
    return sum(a * b for a, b in matmul_shapes(model_dir))


def pass_seconds(model_dir: str, rows: int, dtype: str = "float32", reps: int = 5, budget_s: float = 2.0) -> float:
    """Seconds of one warm pass of `rows` rows through the model's matrices in `dtype` (see the module docstring)."""
    shapes = matmul_shapes(model_dir)
    dt = getattr(torch, dtype)
    weights = [torch.randn(a, b, dtype=dt) for a, b in shapes]
    x = {d: torch.randn(rows, d, dtype=dt) for d in {a for a, _ in shapes}}

    def one_pass() -> float:
        t0 = time.perf_counter()
        for w in weights:
            x[w.shape[0]] @ w
        return time.perf_counter() - t0

    with torch.inference_mode():
        one_pass()  # warm-up: kernels built for each shape
        start = time.perf_counter()
        best = one_pass()
        if best > budget_s:  # slow once warm too (emulated bf16): one pass is measurement enough
            return best
        for _ in range(reps - 1):
            best = min(best, one_pass())
            if time.perf_counter() - start > budget_s:
                break
    return best


def gflops(model_dir: str, rows: int, dtype: str = "float32", **kw) -> float:
    """GFLOP/s of the model's matrix products at `rows` rows in `dtype` on this machine (2 FLOP per weight and row)."""
    return 2 * matmul_params(model_dir) * rows / pass_seconds(model_dir, rows, dtype, **kw) / 1e9
