"""Hand-written Triton kernels of the FP8 path, where torch.compile's own fall short (CUDA only; each has the
plain-torch formula as its CPU path and reference).

``rescale_fp8_``: shrink an e4m3 tensor in place by a device-side ratio, skipping the pass when the ratio is 1.
An FP8 KV cache kept at one running scale per layer (``SelfKVCache(fp8_scaling="tensor")``) must shrink its
stored values whenever a new block raises the scale: x8 <- round(x8 * s_old / s_new). That happens in the first
blocks of a session and rarely after, but a CUDA graph cannot branch on a device value, so the pass is a kernel
that reads the ratio first and returns at once when it is 1: a replay pays a launch, not a 50 MB read and write
per layer. The torch path is exact for a ratio of 1 (x * 1 rounds to itself).

``gelu_quantize_rows``: the FFN middle of an FP8 DiT, GELU-tanh and the per-row e4m3 quantisation of its output,
one row per program held in registers: the row is read once. Inductor's kernel for it took 152 us per W1 call
in a graph, 4.6 ms of a 70 ms fast-mode forward (H100 profile, 2026-12-06), and ran at 196 us standalone; what
limits both is the tanh (libdevice tanhf: 170-266 us whatever the warps), not memory. With the PTX
``tanh.approx.f32`` (one special-function op, ~2^-11 relative error, far below the bf16 rounding that follows)
it is 95 us, and W1 fast mode went from 299.6 to 286.3 ms per steady block (BENCHMARKS.md, session 5). Otherwise the
arithmetic of ``quantize_rows(F.gelu(x, approximate="tanh"))``: GELU in float32, rounded to x's dtype as
F.gelu's output is, then amax / 448 and round-to-nearest e4m3.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8 import E4M3, E4M3_MAX, TINY, quantize_rows

try:  # triton comes with CUDA builds of torch; CPU-only installs have no need of it
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def rescale_fp8_(x8: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """x8 (e4m3, contiguous) <- e4m3(x8 * ratio) in place; ratio is a one-element float32 tensor <= 1."""
    if x8.dtype != E4M3 or not x8.is_contiguous():
        raise ValueError("rescale_fp8_ needs a contiguous float8_e4m3fn tensor")
    if x8.is_cuda and triton is not None:
        n = x8.numel()
        programs = min(triton.cdiv(n, _BLOCK), 4 * torch.cuda.get_device_properties(x8.device).multi_processor_count)
        _rescale_kernel[(programs,)](x8.view(-1), ratio.reshape(1), n, BLOCK=_BLOCK)
        return x8
    y = (x8.float() * ratio.reshape(())).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return x8.copy_(y)


def gelu_quantize_rows_formula(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows(F.gelu(x, approximate="tanh"))


def gelu_quantize_rows(x: torch.Tensor, fallback=gelu_quantize_rows_formula, tanh: int | None = None,
                       num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows(gelu_tanh(x)) for a row-major [M, K] x: (e4m3 [M, K], float32 scales [M, 1]). What the
    kernel does not take (CPU, no triton, other layouts) goes to ``fallback``: the formula, or a compiled copy."""
    if not (x.is_cuda and triton is not None and x.dim() == 2 and x.stride(1) == 1 and x.shape[1] <= _MAX_COLS):
        return fallback(x)
    m, k = x.shape
    out = torch.empty((m, k), dtype=E4M3, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    warps = num_warps or (8 if block >= 2048 else 4)
    _gelu_quant_kernel[(m,)](x, out, scale, k, x.stride(0), out.stride(0), TINY, E4M3_MAX, BLOCK=block,
                             TANH=GELU_TANH if tanh is None else tanh, num_warps=warps)
    return out, scale


_BLOCK = 4096
GELU_TANH = 2   # 0: libdevice tanhf; 1: 1 - 2 / (1 + exp(2z)); 2: PTX tanh.approx.f32 (H100: 195.7 -> 95.0 us)
_MAX_COLS = 32768   # one row per program in registers

if triton is not None:
    @triton.jit
    def _rescale_kernel(x_ptr, ratio_ptr, n, BLOCK: tl.constexpr):
        r = tl.load(ratio_ptr)
        if r != 1.0:   # the common case in a long session: nothing to do
            start = tl.program_id(0) * BLOCK
            step = tl.num_programs(0) * BLOCK
            for off in range(start, n, step):
                idx = off + tl.arange(0, BLOCK)
                keep = idx < n
                x = tl.load(x_ptr + idx, mask=keep).to(tl.float32)
                tl.store(x_ptr + idx, (x * r).to(x_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=keep)

    @triton.jit
    def _gelu_quant_kernel(x_ptr, out_ptr, scale_ptr, k, stride_x, stride_o, tiny, fp8_max, BLOCK: tl.constexpr,
                           TANH: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        keep = cols < k
        x = tl.load(x_ptr + row * stride_x + cols, mask=keep, other=0.0).to(tl.float32)
        x3 = x * x * x                                               # torch's GeluCUDAKernelImpl order
        z = 0.7978845608028654 * (x + 0.044715 * x3)
        if TANH == 0:
            t = libdevice.tanh(z)
        elif TANH == 1:
            t = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * z))
        else:
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [z], dtype=tl.float32, is_pure=True,
                                          pack=1)
        y = 0.5 * x * (1.0 + t)
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)            # F.gelu's output is in x's dtype
        s = tl.maximum(tl.max(tl.abs(y), axis=0), tiny) / fp8_max
        q = tl.minimum(tl.maximum(y / s, -fp8_max), fp8_max)
        tl.store(out_ptr + row * stride_o + cols, q.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
                 mask=keep)
        tl.store(scale_ptr + row, s)
