"""Rescale an e4m3 tensor in place by a device-side ratio, skipping the pass when the ratio is 1.

An FP8 KV cache kept at one running scale per layer (``SelfKVCache(fp8_scaling="tensor")``) must shrink
its stored values whenever a new block raises the scale: x8 <- round(x8 * s_old / s_new). That happens
in the first blocks of a session and rarely after, but a CUDA graph cannot branch on a device value, so
the pass is written as a kernel that reads the ratio first and returns at once when it is 1: a replay
pays a launch, not a 50 MB read and write per layer. Triton on CUDA (it ships with torch); elsewhere the
plain torch pass, which is exact for a ratio of 1 (x * 1 rounds to itself).
"""
from __future__ import annotations

import torch

from .fp8 import E4M3, E4M3_MAX

try:  # triton comes with CUDA builds of torch; CPU-only installs have no need of it
    import triton
    import triton.language as tl
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


_BLOCK = 4096

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
