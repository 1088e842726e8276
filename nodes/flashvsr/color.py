"""Colour correction of FlashVSR's output against its LQ input (upstream ``TorchColorCorrectorWavelet``).

The one-step DiT + TCDecoder can shift colours; both upstream pipelines pull each output
frame's colour statistics back to the bicubically upscaled LQ frame it came from:

- ``adain``: per frame and channel, standardise the output over H*W and give it the LQ's mean
  and std (population variance + 1e-5). What both pipelines call (the class default is wavelet).
- ``wavelet``: keep the output's high frequencies and the LQ's low ones: 5 levels of a
  dilated 3x3 binomial blur (dilation and replicate padding 2**i), high = sum of
  (level - blurred level), low = the last blur; out = high(output) + low(LQ).

Both clamp to [-1, 1]. Both are per frame, so chunking (upstream v1 corrects 16 frames at a
time, v1.1 per DiT chunk) never changes the result. Upstream wraps the call in
``try/except: pass``; here a shape mismatch is an error, not a silently skipped correction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("none", "adain", "wavelet")
EPS = 1e-5
LEVELS = 5


def _per_frame(x: torch.Tensor) -> torch.Tensor:
    """[N, T, C, H, W] -> [N*T, C, H, W]."""
    return x.flatten(0, 1)


def adain(hq: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Frames [N*T, C, H, W]: hq standardised per (frame, channel), rescaled to lq's statistics."""
    def stats(x):
        flat = x.flatten(2)
        std = (flat.var(dim=2, unbiased=False) + EPS).sqrt()
        return flat.mean(dim=2)[..., None, None], std[..., None, None]
    m_hq, s_hq = stats(hq)
    m_lq, s_lq = stats(lq)
    return (hq - m_hq) / s_hq * s_lq + m_lq


def _blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=x.dtype, device=x.device) / 16
    c = x.shape[1]
    padded = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, k.expand(c, 1, 3, 3), dilation=dilation, groups=c)


def wavelet_split(x: torch.Tensor, levels: int = LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) of frames [N*T, C, H, W]: high + low == x up to rounding."""
    high = torch.zeros_like(x)
    low = x
    for i in range(levels):
        blurred = _blur(low, 2 ** i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet(hq: torch.Tensor, lq: torch.Tensor, levels: int = LEVELS) -> torch.Tensor:
    return wavelet_split(hq, levels)[0] + wavelet_split(lq, levels)[1]


def color_correct(hq: torch.Tensor, lq: torch.Tensor, method: str = "adain") -> torch.Tensor:
    """Output frames ``hq`` [N, T, C, H, W] in [-1, 1] corrected towards the LQ frames ``lq`` (same shape)."""
    if method not in METHODS:
        raise ValueError(f"colour correction must be one of {METHODS}, got {method!r}")
    if method == "none":
        return hq
    if hq.shape != lq.shape:
        raise ValueError(f"colour correction: output frames {tuple(hq.shape)} and LQ frames {tuple(lq.shape)} differ")
    fn = adain if method == "adain" else wavelet
    out = fn(_per_frame(hq), _per_frame(lq.to(hq.dtype)))
    return out.clamp(-1, 1).unflatten(0, hq.shape[:2])
