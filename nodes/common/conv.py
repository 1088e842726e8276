"""Convolution helpers shared by the video decoders (the Wan VAE and TAEHV).

Both decoders upsample by nearest x2 followed by a 3x3 conv. Computed as written,
that conv reads an upsampled tensor four times the size of its input. The same
function is one 2x2 conv on the low-res input with four output phases, which are
then interleaved: 16 taps per low-res pixel instead of 36, and no upsampled tensor
is ever written. Both decoders also let cuDNN time all of its conv plans on the first,
eager block before CUDA graphs replay the winner.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


# cuDNN plans torch times per conv shape under cudnn.benchmark; 0 = every plan cuDNN offers (torch's default is 10).
# The decoders' 96-channel 3x3x3 conv (480x832) has its fastest plan past the first ten heuristic picks: on an H100
# 4.76 ms with every plan tried vs 6.31 ms with ten (benchmarks/fp8_conv_probe.py, 2026-12-06); the search costs
# a few seconds once per shape, on the first (eager) chunk, before CUDA graphs replay the winner.
AUTOTUNE_PLAN_LIMIT = 0


@contextlib.contextmanager
def cudnn_autotune(enabled: bool = True, plan_limit: int | None = AUTOTUNE_PLAN_LIMIT):
    """Scoped ``cudnn.benchmark``: cuDNN times its conv plans once per shape (the first, eager chunk; graphs
    then replay the winner), up to ``plan_limit`` of them (0: all; None: the caller's limit). Restores the
    caller's settings on exit; disabled, it leaves both as the caller set them."""
    before = torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit
    if enabled:
        torch.backends.cudnn.benchmark = True
        if plan_limit is not None:
            torch.backends.cudnn.benchmark_limit = plan_limit
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit = before


def subpixel_weights(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A 3x3 conv after a nearest x2 upsample, as one 2x2 conv on the low-res input.

    Output pixel (2i+a, 2j+b) reads upsampled rows 2i+a-1..2i+a+1, i.e. low-res rows
    {i-1, i} (a=0: taps k0 | k1+k2) or {i, i+1} (a=1: k0+k1 | k2), likewise for columns;
    the zero padding maps to zero padding. The four phases are stacked as output channel
    blocks (phase 2a+b), each a 2x2 kernel: 16 taps per low-res pixel instead of 36, and
    no upsampled tensor is ever written. Sums are taken in float32.
    """
    w = conv.weight.float()
    rows = (torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),
            torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2))
    phases = []
    for a in range(2):
        r = rows[a]
        for cols in ((r[..., 0], r[..., 1] + r[..., 2]), (r[..., 0] + r[..., 1], r[..., 2])):
            phases.append(torch.stack(cols, -1))
    w4 = torch.cat(phases, 0).to(conv.weight.dtype)
    bias = None if conv.bias is None else conv.bias.repeat(4)
    return w4, bias


def interleave_phases(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Scatter the 4 phase blocks of a sub-pixel conv's output [.., 4co, (t,) h+1, w+1] into
    ``out`` [.., co, (t,) 2h, 2w]: out pixel (2i+a, 2j+b) is phase 2a+b at (i+a, j+b)."""
    co, h, w = out.shape[1], out.shape[-2] // 2, out.shape[-1] // 2
    for p in range(4):
        a, c = divmod(p, 2)
        out[..., a::2, c::2] = y[:, p * co:(p + 1) * co, ..., a:a + h, c:c + w]
    return out
