"""Turning pixel tensors ([B, T, 3, H, W] in [-1, 1]) into uint8 frames for writers."""
from __future__ import annotations

import numpy as np
import torch


def to_uint8_frames(pixels: torch.Tensor, sample: int = 0) -> np.ndarray:
    """[T, H, W, 3] uint8 of one batch sample."""
    if pixels.dim() == 4:
        pixels = pixels[None]
    x = pixels[sample].detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()
