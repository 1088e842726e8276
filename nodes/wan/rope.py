"""Wan 3-D rotary position embedding.

Head dim D holds D/2 rotation pairs (adjacent elements (2i, 2i+1), as upstream's
view_as_complex), split over the axes as upstream: time gets c - 2*(c//3) pairs,
height and width c//3 each (c = D/2). Angles are position * theta^(-2j/n_axis)
in float64, as upstream's table; positions are computed on the fly, so there is
no 1024-frame limit. The rotation itself runs in float32 (upstream: float64),
well inside the fp32 parity budget and cheap on GPU.
"""
from __future__ import annotations

import torch


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _inv_freq(pairs: int, theta: float = 10000.0) -> torch.Tensor:
    n = 2 * pairs
    return 1.0 / torch.pow(theta, torch.arange(0, n, 2, dtype=torch.float64) / n)


def rope_cos_sin(head_dim: int, frame_start: int, f: int, h: int, w: int,
                 device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [f*h*w, 1, D/2] float32 for tokens in (frame, row, col) order, frames from frame_start."""
    pt, ph, pw = axis_pairs(head_dim)
    at = torch.outer(torch.arange(frame_start, frame_start + f, dtype=torch.float64), _inv_freq(pt))
    ah = torch.outer(torch.arange(h, dtype=torch.float64), _inv_freq(ph))
    aw = torch.outer(torch.arange(w, dtype=torch.float64), _inv_freq(pw))
    ang = torch.cat([at[:, None, None].expand(f, h, w, pt), ah[None, :, None].expand(f, h, w, ph),
                     aw[None, None, :].expand(f, h, w, pw)], dim=-1).reshape(f * h * w, 1, -1)
    ang = ang.to(device)
    return ang.cos().float(), ang.sin().float()


def frame_shift_cos_sin(head_dim: int, frames: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [1, 1, D/2] that move already-rotated keys by `frames` along time only."""
    pt, ph, pw = axis_pairs(head_dim)
    ang = torch.cat([frames * _inv_freq(pt), torch.zeros(ph + pw, dtype=torch.float64)]).view(1, 1, -1)
    ang = ang.to(device)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by angles given as cos/sin broadcastable to [L, H, D/2]."""
    xp = x.float().unflatten(-1, (-1, 2))
    re, im = xp[..., 0], xp[..., 1]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)
