"""Classifier-free guidance as Wan applies it to flow predictions.

Wan (text2video.py / image2video.py) runs the model once with the prompt and once with the
negative prompt and extrapolates: ``uncond + scale * (cond - uncond)``. The expression is
kept in exactly that form because other algebraically equal forms round differently.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Guided prediction ``uncond + scale * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def guided(model: Callable[..., Tensor], x: Tensor, t: Any, cond: dict, uncond: dict,
           scale: float, batched: bool = False) -> Tensor:
    """Evaluate ``model(x, t, **cond)`` and ``model(x, t, **uncond)`` and combine them.

    ``batched`` stacks both passes into one call along dim 0: the conditioning dicts must
    then hold tensors with a leading batch dim that concatenate (same shapes), and ``t`` is
    repeated when it is a tensor with a batch dim. Both passes always run, as upstream.
    """
    if not batched:
        return cfg_combine(model(x, t, **cond), model(x, t, **uncond), scale)
    both = {k: torch.cat([cond[k], uncond[k]]) if isinstance(cond[k], Tensor) else cond[k] for k in cond}
    tt = torch.cat([t, t]) if isinstance(t, Tensor) and t.ndim > 0 else t
    out_c, out_u = model(torch.cat([x, x]), tt, **both).chunk(2)
    return cfg_combine(out_c, out_u, scale)
