"""Wan 3-D rotary position embedding.

Head dim D holds D/2 rotation pairs (adjacent elements (2i, 2i+1), as upstream's
view_as_complex), split over the axes as upstream: time gets c - 2*(c//3) pairs,
height and width c//3 each (c = D/2). Angles are position * theta^(-2j/n_axis)
in float64, as upstream's table; positions are computed on the fly, so there is
no 1024-frame limit. The rotation itself runs in float32 (upstream: float64),
well inside the fp32 parity budget and cheap on GPU.

Tables are built on the target device (no host-to-device copy per call, which a
CUDA-graph capture could not contain); ``RopeTable`` keeps the few most recent
ones, since a causal block reuses its table for every denoising step.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _inv_freq(pairs: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    n = 2 * pairs
    return 1.0 / torch.pow(theta, torch.arange(0, n, 2, dtype=torch.float64, device=device) / n)


def rope_cos_sin(head_dim: int, frame_start: int, f: int, h: int, w: int,
                 device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [f*h*w, 1, D/2] float32 for tokens in (frame, row, col) order, frames from frame_start."""
    pt, ph, pw = axis_pairs(head_dim)
    f64 = dict(dtype=torch.float64, device=device)
    at = torch.outer(torch.arange(frame_start, frame_start + f, **f64), _inv_freq(pt, device=device))
    ah = torch.outer(torch.arange(h, **f64), _inv_freq(ph, device=device))
    aw = torch.outer(torch.arange(w, **f64), _inv_freq(pw, device=device))
    ang = torch.cat([at[:, None, None].expand(f, h, w, pt), ah[None, :, None].expand(f, h, w, ph),
                     aw[None, None, :].expand(f, h, w, pw)], dim=-1).reshape(f * h * w, 1, -1)
    return ang.cos().float(), ang.sin().float()


def frame_shift_cos_sin(head_dim: int, frames: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [1, 1, D/2] that move already-rotated keys by `frames` along time only."""
    pt, ph, pw = axis_pairs(head_dim)
    ang = torch.cat([frames * _inv_freq(pt, device=device),
                     torch.zeros(ph + pw, dtype=torch.float64, device=device)]).view(1, 1, -1)
    return ang.cos().float(), ang.sin().float()


class RopeTable:
    """The last few (frame_start, f, h, w) -> (cos, sin) tables, kept on the device."""

    def __init__(self, head_dim: int, size: int = 4):
        self.head_dim, self.size = head_dim, size
        self.tables: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, frame_start: int, f: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (frame_start, f, h, w, str(device))
        if key in self.tables:
            self.tables.move_to_end(key)
        else:
            self.tables[key] = rope_cos_sin(self.head_dim, frame_start, f, h, w, device=device)
            while len(self.tables) > self.size:
                self.tables.popitem(last=False)
        return self.tables[key]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, L, H, D] by angles given as cos/sin broadcastable to [L, H, D/2]."""
    xp = x.float().unflatten(-1, (-1, 2))
    re, im = xp[..., 0], xp[..., 1]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)
