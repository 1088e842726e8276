"""Functions run on spawned ranks by tests/test_parallel.py (spawn needs them importable by name)."""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from engine.parallel import make_context_groups
from nodes.common.ring import ring_attention, ring_attention_gather
from nodes.common.ulysses import ulysses_attention


def frame_split(frames: int, n: int) -> list[int]:
    """Contiguous frame counts per rank, earlier ranks get the remainder (a rank may get 0)."""
    return [frames // n + (r < frames % n) for r in range(n)]


def attention_cases(world, cases: dict) -> dict:
    """Run every primitive on this rank's share of the full tensors in ``cases``; return this rank's outputs."""
    n, rank = world.world_size, world.rank
    groups = make_context_groups(n, {"ring_dit": n, "uly_dit": n, "plain": 1},
                                 {"ring_dit": "ring", "uly_dit": "ulysses", "plain": "ring"})
    g, gu, plain = groups["ring_dit"], groups["uly_dit"], groups["plain"]
    out = {"group": (g.rank, g.size, g.ranks, gu.strategy, plain.size, plain.active)}

    # (b) KV cache sharded by frames, query block replicated.
    for name, c in cases["cache"].items():
        counts = frame_split(c["frames"], n)
        start = sum(counts[:rank]) * c["tokens_per_frame"]
        end = start + counts[rank] * c["tokens_per_frame"]
        out[f"cache.{name}"] = ring_attention_gather(c["q"], c["k"][:, start:end], c["v"][:, start:end], g)

    # (c) bidirectional, q/k/v sharded along the sequence; (d) Ulysses, same sharding.
    q, k, v = cases["seq"]["q"], cases["seq"]["k"], cases["seq"]["v"]
    shard = q.shape[1] // n
    sl = slice(rank * shard, (rank + 1) * shard)
    out["ring"] = ring_attention(q[:, sl], k[:, sl], v[:, sl], g)
    out["ulysses"] = ulysses_attention(q[:, sl], k[:, sl], v[:, sl], gu)
    try:
        bad = torch.zeros(1, shard, n * 2 + 1, 8)
        ulysses_attention(bad, bad, bad, gu)
        out["ulysses_bad_heads"] = None
    except ValueError as e:
        out["ulysses_bad_heads"] = str(e)
    dist.barrier()
    return out


def _note_pid(pid_dir: str, rank: int) -> None:
    path = os.path.join(pid_dir, f"rank{rank}.pid")
    with open(path + ".tmp", "w") as f:   # atomic: a rank killed mid-write must not leave an empty pid file
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)


def subgroup_cases(world, qs: list, k: torch.Tensor, v: torch.Tensor) -> dict:
    """World of 4 cut into two context groups of 2: each pair attends its own query, never the other's."""
    groups = make_context_groups(world.world_size, {"pair": 2, "all": world.world_size})
    g = groups["pair"]
    pair = world.rank // 2
    half = k.shape[1] // 2
    sl = slice(g.rank * half, (g.rank + 1) * half)
    return {"pair": pair, "ranks": groups["pair"].ranks, "all_size": groups["all"].size,
            "out": ring_attention_gather(qs[pair], k[:, sl], v[:, sl], g)}


def raise_on_rank1(world, pid_dir: str) -> None:
    """Rank 1 raises while rank 0 waits in a collective for it: without handling, rank 0 hangs."""
    _note_pid(pid_dir, world.rank)
    if world.rank == 1:
        raise RuntimeError("boom from rank 1")
    t = torch.ones(1)
    dist.all_reduce(t)


def die_on_rank1(world, pid_dir: str) -> None:
    """Rank 1 dies without a Python exception (as with a segfault or the OOM killer)."""
    _note_pid(pid_dir, world.rank)
    if world.rank == 1:
        os._exit(7)
    dist.all_reduce(torch.ones(1))


def hang_on_rank1(world, pid_dir: str) -> None:
    """Rank 1 never arrives; only the launch deadline can end this (the group timeout is set longer)."""
    _note_pid(pid_dir, world.rank)
    if world.rank == 1:
        time.sleep(1000)
    dist.all_reduce(torch.ones(1))

