"""Process groups for context parallelism: who shares a sequence with whom.

A node that runs with ``parallel: {context: N}`` splits its attention over N
ranks. The world is cut into ``world_size / N`` contiguous groups of N ranks;
each rank keeps the one group it belongs to. A group of size 1 (or a run with
no torch.distributed at all) is the plain single-device path: every primitive
in this package checks ``group.active`` first and falls straight through to
ordinary attention, with no collective and no copy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

STRATEGIES = ("ring", "ulysses")


@dataclass(frozen=True)
class ParallelGroup:
    """This rank's view of one context-parallel group."""
    rank: int = 0                    # rank inside the group, 0..size-1
    size: int = 1
    group: Any = None                # torch.distributed ProcessGroup, None for the plain path
    strategy: str = "ring"           # 'ring' | 'ulysses'
    ranks: tuple[int, ...] = (0,)    # global ranks of the group, in group-rank order (P2P peers need them)

    @property
    def active(self) -> bool:
        """False means: do plain single-device attention, touch no collective."""
        return self.size > 1

    def global_rank(self, group_rank: int) -> int:
        return self.ranks[group_rank % self.size]


SINGLE = ParallelGroup()


@dataclass(frozen=True)
class WorldInfo:
    """What ``init_distributed`` found: enough for a rank to pick its device and its groups."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None       # None: torch.distributed not initialised (single process)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _pick_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_distributed(backend: str = "auto", timeout_s: float = 300.0) -> WorldInfo:
    """Join the process group described by the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT). Without WORLD_SIZE > 1 nothing is initialised: single process.

    The timeout bounds every collective, so a rank whose peer died fails instead of hanging forever.
    Calling it again once initialised just reports the existing world.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        be = dist.get_backend()
        return WorldInfo(rank, world, local_rank, be, _device_for(be, local_rank))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return WorldInfo(device=torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    be = _pick_backend(backend)
    device = _device_for(be, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(be, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return WorldInfo(rank, world, local_rank, be, device)


def _device_for(backend: str, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")


def check_context_size(n: Any, world_size: int) -> str | None:
    """Why ``parallel: {context: n}`` cannot run on ``world_size`` ranks, or None when it can."""
    if isinstance(n, bool) or not isinstance(n, int):
        return f"context size must be an integer, got {n!r}"
    if n < 1:
        return f"context size must be >= 1, got {n}"
    if world_size % n != 0:
        return (f"context size {n} must divide the world size {world_size} "
                f"(launch with a multiple of {n} processes, e.g. --nproc {n})")
    return None


def make_context_groups(world_size: int, sizes: dict[str, int], strategies: dict[str, str] | None = None,
                        rank: int | None = None) -> dict[str, ParallelGroup]:
    """One ParallelGroup per node name, for this rank.

    ``torch.distributed.new_group`` is collective over the whole world and must be called by every
    rank in the same order, including for groups a rank is not in. So the order here depends only on
    the set of sizes (sorted), never on dict order or on the rank; nodes with the same size share
    the same communicator instead of creating one each.
    """
    strategies = strategies or {}
    for name, n in sizes.items():
        err = check_context_size(n, world_size)
        if err:
            raise ValueError(f"node {name!r}: {err}")
        s = strategies.get(name, "ring")
        if s not in STRATEGIES:
            raise ValueError(f"node {name!r}: parallel strategy must be one of {STRATEGIES}, got {s!r}")
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if any(n > 1 for n in sizes.values()) and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("context size > 1 needs torch.distributed: call init_distributed() under a launcher first")

    mine: dict[int, tuple[Any, tuple[int, ...]]] = {}
    for n in sorted(set(sizes.values())):
        if n == 1:
            continue
        for start in range(0, world_size, n):
            ranks = tuple(range(start, start + n))
            pg = dist.group.WORLD if n == world_size else dist.new_group(list(ranks))
            if rank in ranks:
                mine[n] = (pg, ranks)

    out = {}
    for name, n in sizes.items():
        s = strategies.get(name, "ring")
        if n == 1:
            out[name] = ParallelGroup(strategy=s, ranks=(rank,))
        else:
            pg, ranks = mine[n]
            out[name] = ParallelGroup(ranks.index(rank), n, pg, s, ranks)
    return out
