"""Context-parallel Wan DiT (ring, Ulysses) is exact against one process: CPU, gloo, 2 and 3 local ranks.

A tiny random-weight DiT with 6 heads (divisible by 2 and 3) on a latent whose patch grid has 6
tokens per frame. Checked: the bidirectional forward, and full AR rollouts (4 blocks, 4 steps
each, seeded re-noise draws) over a full cache and over a sink + window cache that evicts frames,
in both RoPE modes: the final latents of every rank equal the single-process rollout.
"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import cp_workers as cw
from engine.parallel import SINGLE, ParallelGroup, spawn_ranks
from nodes.checkpoint import random_init
from nodes.wan.config import WanConfig
from nodes.common.sharding import TokenSharding, make_rank_cache
from nodes.wan.dit import WanDiT
from nodes.common.kv_cache import SelfKVCache

TOL = dict(rtol=1e-5, atol=1e-5)
CFG = dict(text_len=8, in_dim=4, dim=48, ffn_dim=64, text_dim=8, out_dim=4, num_heads=6, num_layers=2)
CACHES = {
    "full": dict(max_frames=8),
    "window_absolute": dict(sink_frames=1, window_frames=4, rope_mode="absolute"),
    "window_relative": dict(sink_frames=1, window_frames=4, rope_mode="relative"),
}


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _state() -> dict:
    return random_init(WanDiT(WanConfig(**CFG)), seed=3).state_dict()


def _case() -> dict:
    """Latent 4 x 6 -> a 2 x 3 patch grid: 6 tokens per frame; 8 frames in blocks of 2."""
    return dict(
        noise=_rand(1, 8, 4, 4, 6, seed=1), context=_rand(1, 5, 8, seed=2), shift=5.0, seed=7,
        steps=[1000, 750, 500, 250], frames_per_block=2, caches=CACHES,
        bidir=dict(x=_rand(2, 4, 3, 4, 6, seed=4), t=torch.tensor([900.0, 300.0]), context=_rand(2, 6, 8, seed=5)))


@pytest.fixture(scope="module")
def reference():
    state, case = _state(), _case()
    return state, case, cw.run_cases(cw.build_model(CFG, state), case, None)


@pytest.mark.parametrize("nproc", [2, 3])
def test_context_parallel_dit_matches_one_process(reference, nproc):
    state, case, ref = reference
    results = spawn_ranks(cw.rank_cases, nproc, args=(CFG, state, case), timeout_s=60)
    for rank, by_strategy in enumerate(results):
        for strategy, out in by_strategy.items():
            for name in ["bidir", *CACHES]:
                assert_close(out[name], ref[name], **TOL, msg=lambda m: f"rank {rank} {strategy} {name}: {m}")
            for name in CACHES:                                   # every rank holds 1/N of the cache
                assert out[f"{name}.numel"] * nproc == ref[f"{name}.numel"]
    # the window really evicted and the two RoPE modes really differ (else the cases prove less)
    assert not torch.allclose(ref["window_absolute"], ref["full"], atol=1e-3)
    assert not torch.allclose(ref["window_relative"], ref["window_absolute"], atol=1e-3)


def test_group_of_one_is_the_plain_path_bit_for_bit(reference):
    state, case, ref = reference
    model = cw.build_model(CFG, state)
    for group in (SINGLE, ParallelGroup(strategy="ulysses")):
        out = cw.run_cases(model, case, group)
        for name in ["bidir", *CACHES]:
            assert torch.equal(out[name], ref[name]), name
        for name in CACHES:
            assert out[f"{name}.numel"] == ref[f"{name}.numel"]


def test_rank_cache_shapes_and_clear_errors():
    cfg = WanConfig(**CFG)
    ring, uly = ParallelGroup(1, 3, None, "ring", (0, 1, 2)), ParallelGroup(1, 3, None, "ulysses", (0, 1, 2))
    plain = SelfKVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim, 12, sink_frames=1, window_frames=4)
    for group, heads, tokens in ((ring, 6, 4), (uly, 2, 12), (None, 6, 12)):
        c = make_rank_cache(cfg, group, 12, sink_frames=1, window_frames=4)
        assert (c.k.shape[3], c.frame_tokens) == (heads, tokens)
        assert c.plan(4, 2).writes == tuple((d // 12 * tokens, s // 12 * tokens, n // 12 * tokens)
                                            for d, s, n in plain.plan(4, 2).writes)
    with pytest.raises(ValueError, match="12 patch tokens over 5 ranks"):
        make_rank_cache(cfg, ParallelGroup(0, 5, None, "ring", tuple(range(5))), 12, max_frames=4)
    with pytest.raises(ValueError, match="6 heads are not divisible by the context size 4"):
        make_rank_cache(cfg, ParallelGroup(0, 4, None, "ulysses", tuple(range(4))), 12, max_frames=4)
    tokens, rope = torch.zeros(1, 2 * 6, 48), (torch.zeros(12, 1, 4), torch.zeros(12, 1, 4))
    with pytest.raises(ValueError, match="6 patch tokens over 4 ranks"):
        TokenSharding(ParallelGroup(0, 4, None, "ring", tuple(range(4)))).shard(tokens, rope, 2)


def test_shard_keeps_each_frames_slice_with_its_global_rope_rows():
    """Rank r of 3 keeps tokens [2r, 2r+2) of each 6-token frame, and the same rows of cos/sin."""
    tokens = torch.arange(2 * 6, dtype=torch.float32).view(1, 12, 1).expand(1, 12, 3)
    rope = (torch.arange(12.0).view(12, 1, 1), -torch.arange(12.0).view(12, 1, 1))
    for r in range(3):
        local, (cos, sin) = TokenSharding(ParallelGroup(r, 3, None, "ring", (0, 1, 2))).shard(tokens, rope, 2)
        want = [2 * r, 2 * r + 1, 6 + 2 * r, 7 + 2 * r]
        assert local[0, :, 0].tolist() == want and cos.flatten().tolist() == want
        assert sin.flatten().tolist() == [-w for w in want]
