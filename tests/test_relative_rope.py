"""The KV window and both RoPE modes against an independent reference (tests/window_reference.py).

A causal Wan DiT rolls out block after block on ``SelfKVCache`` and, from the same inputs, on
``ExplicitWindow``, which keeps pre-RoPE keys per frame and on every call lists the attended frames
and rotates each key at the position the mode defines, from scratch. The two must give the same
flow on every call: before, at and after eviction, with a sink of 0, 1 or 2 frames, blocks of 1
to 3 frames. No golden covers ``rope_mode: relative`` (upstream has only ``absolute``), so this is
what pins its numbers: a sink shift of the wrong sign or size, or a wrong set of kept frames,
changes the flow after the first eviction.
"""
from __future__ import annotations

import pytest
import torch

from nodes.common.kv_cache import SelfKVCache
from nodes.common.rope import apply_rope, rope_cos_sin
from nodes.wan.config import WanConfig
from nodes.wan.dit import WanDiT
from window_reference import ExplicitWindow, rope_angles, rotate

GRID = (2, 3)          # latent 4 x 6 through 2 x 2 patches
TOL = dict(atol=2e-5, rtol=2e-5)


def tiny_dit(seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    cfg = WanConfig(text_len=8, in_dim=4, dim=32, ffn_dim=48, text_dim=8, out_dim=4, num_heads=2, num_layers=2)
    m = WanDiT(cfg).eval().requires_grad_(False)
    m.head.head.weight.normal_(0, 0.2)   # upstream zero-inits the head: make the output depend on the input
    return m


def test_reference_rope_is_the_dits_rope():
    """The reference's own RoPE agrees with the DiT's at absolute positions, so un-rotating what the DiT
    writes recovers the pre-RoPE keys."""
    x = torch.randn(1, 3 * 6, 2, 16)
    t = torch.arange(5, 8).repeat_interleave(6)
    h = torch.arange(2).repeat_interleave(3).repeat(3)
    w = torch.arange(3).repeat(6)
    torch.testing.assert_close(rotate(x, rope_angles(16, t, h, w)).float(), apply_rope(x, *rope_cos_sin(16, 5, 3, 2, 3)),
                               atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rotate(rotate(x, rope_angles(16, t, h, w)), -rope_angles(16, t, h, w)).float(), x,
                               atol=1e-6, rtol=1e-6)


def rollout(model: WanDiT, cache, blocks: int, nfpb: int, seed: int = 3) -> list[torch.Tensor]:
    """Two calls per block, as ar.sampler makes them: a noisy denoising call, then the context pass
    on other latents at t = 0 (it overwrites the block's K/V)."""
    g = torch.Generator().manual_seed(seed)
    cross = model.prepare_cross(torch.randn(1, 5, 8, generator=g))
    outs = []
    with torch.no_grad():
        for b in range(blocks):
            for t in (700.0, 0.0):
                x = torch.randn(1, nfpb, 4, 4, 6, generator=g)
                outs.append(model.forward_causal(x, torch.full((1, nfpb), t), cross, cache, b * nfpb))
    return outs


# (sink, window, frames per block, blocks): every case runs several blocks past the first eviction
CASES = [(1, 4, 1, 8), (2, 5, 1, 9), (1, 5, 2, 6), (2, 8, 3, 6), (0, 4, 2, 5), (1, None, 1, 5)]


@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize("sink,window,nfpb,blocks", CASES)
def test_rollout_attends_like_explicitly_positioned_keys(mode, sink, window, nfpb, blocks):
    model = tiny_dit()
    cfg = model.cfg
    cache = SelfKVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim, GRID[0] * GRID[1], sink_frames=sink,
                        window_frames=window, max_frames=blocks * nfpb, rope_mode=mode)
    ref = ExplicitWindow(cfg.head_dim, GRID, sink_frames=sink, window_frames=window, rope_mode=mode)
    got, want = rollout(model, cache, blocks, nfpb), rollout(model, ref, blocks, nfpb)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"block {i // 2} call {i % 2}: {m}")
    # the case reaches what it claims: several eviction points, and in relative mode the sink keys
    # moved by exactly the number of evicted frames
    evicted = [max(pos) + 1 - len(pos) for pos in ref.reads]
    shifts = [{p - j for j, p in pos.items() if j < sink} for pos in ref.reads]
    if window is not None:
        assert len({e for e in evicted if e > 0}) >= 3
    if sink:
        assert shifts == [{e if mode == "relative" else 0} for e in evicted]

def test_relative_differs_from_absolute_exactly_when_the_sink_moves():
    """With a sink, the two modes agree until the first eviction and differ from then on."""
    model = tiny_dit()
    cfg = model.cfg
    outs = {}
    for mode in ("absolute", "relative"):
        cache = SelfKVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim, 6, sink_frames=1, window_frames=4,
                            rope_mode=mode)
        outs[mode] = rollout(model, cache, 6, 1)
    for i in range(8):          # blocks 0-3 fill the 4-frame window
        torch.testing.assert_close(outs["relative"][i], outs["absolute"][i], atol=1e-6, rtol=1e-6)
    for i in range(8, 12):      # from block 4 on, frame 1 is evicted and the sink moves
        assert not torch.allclose(outs["relative"][i], outs["absolute"][i], atol=1e-3)
