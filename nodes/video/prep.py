"""Frame preparation as FlashVSR's inference scripts do it (``infer_flashvsr_*.py``).

Upstream upscales every LR frame with PIL's bicubic filter to ``round(w*scale) x round(h*scale)``,
centre-crops it to the largest multiple of 128 pixels (the DiT attends in (2, 8, 8)-token
windows of 8x8-pixel tokens, 128 px a side), and maps uint8 to [-1, 1] as ``x / 255 * 2 - 1``
in float32. We do the same, with PIL itself, so the LQ frames are bit-identical.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SCALES = (2.0, 4.0)   # what FlashVSR was trained for (x4; x2 is upstream's documented variant)


class PrepError(ValueError):
    """The source cannot be prepared (too small for one block, odd scale); the node names the file."""


@dataclass(frozen=True)
class Geometry:
    """Source size -> upscaled size -> crop (all in pixels, PIL's (width, height) order)."""
    src_w: int
    src_h: int
    scale: float
    up_w: int
    up_h: int
    out_w: int
    out_h: int

    @property
    def left(self) -> int:
        return (self.up_w - self.out_w) // 2

    @property
    def top(self) -> int:
        return (self.up_h - self.out_h) // 2


def geometry(src_w: int, src_h: int, scale: float, multiple: int = 128) -> Geometry:
    """Upstream's ``compute_scaled_and_target_dims``: round the scaled size, floor it to ``multiple``."""
    if src_w <= 0 or src_h <= 0:
        raise PrepError(f"frames of {src_w}x{src_h} pixels")
    up_w, up_h = int(round(src_w * scale)), int(round(src_h * scale))
    out_w, out_h = (up_w // multiple) * multiple, (up_h // multiple) * multiple
    if out_w == 0 or out_h == 0:
        raise PrepError(f"{src_w}x{src_h} frames upscaled x{scale:g} are {up_w}x{up_h}, smaller than one "
                        f"{multiple}x{multiple} block (need at least {-(-multiple // scale):.0f} px a side at x{scale:g})")
    return Geometry(src_w, src_h, scale, up_w, up_h, out_w, out_h)


def upscale_crop(frame: np.ndarray, geo: Geometry) -> np.ndarray:
    """One RGB uint8 frame [h, w, 3] -> [out_h, out_w, 3]: PIL bicubic resize, then the centre crop."""
    from PIL import Image
    if frame.shape[:2] != (geo.src_h, geo.src_w):
        raise PrepError(f"a frame of {frame.shape[1]}x{frame.shape[0]} in a {geo.src_w}x{geo.src_h} video "
                        "(the frame size must not change)")
    img = Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8)).convert("RGB")
    up = img.resize((geo.up_w, geo.up_h), Image.BICUBIC)
    return np.asarray(up.crop((geo.left, geo.top, geo.left + geo.out_w, geo.top + geo.out_h)), dtype=np.uint8)


def to_signed(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> float32 [1, T, 3, H, W] in [-1, 1], upstream's arithmetic order."""
    t = torch.from_numpy(np.ascontiguousarray(frames)).to(torch.float32)
    return (t.permute(0, 3, 1, 2) / 255.0 * 2.0 - 1.0).unsqueeze(0)
