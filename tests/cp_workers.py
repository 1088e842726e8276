"""Rank functions for tests/test_wan_context_parallel.py (spawned ranks need them importable by name).

Shared with the test so both sides build the same model, caches and rollouts: the test runs
``run_cases`` with ``parallel=None`` in its own process as the single-device reference.
"""
from __future__ import annotations

import torch

from engine.parallel import make_context_groups
from nodes.ar import ARRollout, ARSchedule
from nodes.samplers import FlowMatchTable
from nodes.wan.config import WanConfig
from nodes.common.sharding import make_rank_cache
from nodes.wan.dit import WanDiT


def build_model(cfg_kwargs: dict, state: dict) -> WanDiT:
    model = WanDiT(WanConfig(**cfg_kwargs)).eval()
    model.load_state_dict(state, strict=True)
    return model


def rollout(model: WanDiT, case: dict, cache_kwargs: dict, parallel) -> tuple[torch.Tensor, int]:
    """The AR rollout of ``case`` with a (rank) cache; returns the final latents and the cache's element count."""
    cfg = model.cfg
    noise = case["noise"]
    frame_tokens = (noise.shape[-2] // cfg.patch_size[1]) * (noise.shape[-1] // cfg.patch_size[2])
    cache = make_rank_cache(cfg, parallel, frame_tokens, **cache_kwargs)
    cross = model.prepare_cross(case["context"])
    schedule = ARSchedule.build(FlowMatchTable(case["shift"]), case["steps"])
    denoise = lambda x, t, frame_start: model.forward_causal(x, t, cross, cache, frame_start)  # noqa: E731
    roll = ARRollout(denoise, schedule, case["frames_per_block"], noise, seed=case["seed"])
    return roll.run_all(), cache.k.numel()


def run_cases(model: WanDiT, case: dict, parallel) -> dict:
    """Bidirectional forward and every cached rollout of ``case`` with ``model.parallel = parallel``."""
    model.parallel = parallel
    out = {}
    with torch.no_grad():
        bi = case["bidir"]
        out["bidir"] = model(bi["x"], bi["t"], bi["context"])
        for name, kw in case["caches"].items():
            out[name], out[f"{name}.numel"] = rollout(model, case, kw, parallel)
    return out


def rank_cases(world, cfg_kwargs: dict, state: dict, case: dict) -> dict:
    """This rank's results for both strategies over the whole world as one context group."""
    n = world.world_size
    groups = make_context_groups(n, {"ring": n, "ulysses": n}, {"ring": "ring", "ulysses": "ulysses"})
    model = build_model(cfg_kwargs, state)
    return {name: run_cases(model, case, g) for name, g in groups.items()}
