"""Wan 2.2 A14B: a high-noise and a low-noise causal Wan DiT behind one causal-model contract.

``Wan22Experts`` is ``TimestepExperts`` (nodes/common/causal.py) over two ``WanDenoiser``s: a
denoising call at ``t >= boundary`` goes to the high-noise expert, any other to the low-noise one;
each expert keeps its own self-attention KV cache, and the context pass writes the clean block into
both (low-noise expert first, as FastVideo's ``CausalDMDDenosingStage``).

The text cross-attention cache, by ``cross_attention``:

- ``shared_high`` (FastVideo, the reference): ONE cache for both experts, filled from the high-noise
  expert's text embedder and cross-attention K/V projections; the low-noise expert's are never used.
- ``per_expert`` (FlashDreams): each expert attends to its own K/V of the prompt.

The sampler side of Wan 2.2 (x at the boundary for the high-noise expert, add_noise_high, the 1-frame
first block) is ``ar.sampler``'s ``boundary_ratio`` / ``first_block_frames``: nodes/ar/schedule.py.
"""
from __future__ import annotations

from dataclasses import fields

from nodes.common.causal import ExpertStreams, StreamSpec, TimestepExperts

from .causal import WanDenoiser

CROSS_MODES = ("shared_high", "per_expert")


def check_experts(high, low) -> None:
    """Two experts must agree on every size (the shared cross cache and one latent layout need it)."""
    if high.model_type != low.model_type:
        raise ValueError(f"experts differ: model_type {high.model_type} (high) vs {low.model_type} (low)")
    diff = [f"{f.name} {getattr(high, f.name)} (high) vs {getattr(low, f.name)} (low)" for f in fields(high)
            if getattr(high, f.name) != getattr(low, f.name)]
    if diff:
        raise ValueError("the two experts' sizes differ: " + "; ".join(diff))


class Wan22Experts(TimestepExperts):
    """High- and low-noise causal Wan experts split at timestep ``boundary_t`` (boundary_ratio x 1000)."""

    def __init__(self, high: WanDenoiser, low: WanDenoiser, boundary_t: float, cross_attention: str = "shared_high"):
        if cross_attention not in CROSS_MODES:
            raise ValueError(f"cross_attention must be one of {CROSS_MODES}, got {cross_attention!r}")
        check_experts(high.config, low.config)
        super().__init__([(float(boundary_t), high), (0.0, low)])
        self.high, self.low, self.boundary_t, self.cross_attention = high, low, float(boundary_t), cross_attention

    def open_stream(self, spec: StreamSpec) -> "Wan22Streams":
        return Wan22Streams(self, [self.high.open_stream(spec), self.low.open_stream(spec)])


class Wan22Streams(ExpertStreams):
    """Both experts' streams; the prompt's cross-attention K/V as ``cross_attention`` says."""

    def set_conditions(self, **conditions) -> None:
        if self.model.cross_attention == "per_expert":
            return super().set_conditions(**conditions)
        cross = self.streams[0].cross_for(**conditions)   # the high-noise expert's K/V
        for s in self.streams:
            s.set_cross(cross if s is self.streams[0] else _cross_to(cross, s.model.device))

    def denoise(self, x, t, frame_start, **block):
        s = self.streams[self.model.pick(t)]
        dev = s.model.device       # experts may sit on different devices (expert-per-GPU placement)
        out = s.denoise(x.to(dev), t, frame_start, **_to(block, dev))
        return out.to(x.device)

    def commit(self, x, t, frame_start, **block) -> None:
        for s in reversed(self.streams):  # low-noise expert first, as FastVideo's context pass
            dev = s.model.device
            s.commit(x.to(dev), t, frame_start, **_to(block, dev))


def _cross_to(cross, dev):
    from .dit import CrossCache
    move = (lambda ts: None if ts is None else [t.to(dev) for t in ts])
    return CrossCache(move(cross.k), move(cross.v), move(cross.k_img), move(cross.v_img))


def _to(block: dict, dev) -> dict:
    return {k: (v.to(dev) if hasattr(v, "to") else v) for k, v in block.items()}
