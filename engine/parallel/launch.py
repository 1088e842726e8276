"""Run a function on N local processes joined in one process group (tests, ``fd exec --nproc N``).

The failure mode that matters is the hang: one rank raises, its peers sit in a collective waiting
for it forever. Three layers prevent that: the parent watches every child and, as soon as one exits
non-zero, terminates the rest and raises with that rank's traceback; the process group is created
with a timeout, so a collective whose peer vanished fails by itself; and the whole launch has a
deadline after which every child is killed.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import tempfile
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from .groups import WorldInfo, init_distributed


class LaunchError(RuntimeError):
    """A launched rank failed, died, or the launch ran past its timeout."""


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral TCP port that is free right now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _worker(local_rank: int, fn: Callable, args: tuple, nproc: int, port: int, backend: str,
            pg_timeout_s: float, result_dir: str) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = init_distributed(backend, timeout_s=pg_timeout_s)
    try:
        result = fn(world, *args)
        torch.save(result, os.path.join(result_dir, f"rank{local_rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(fn: Callable[..., Any], nproc: int, args: tuple = (), backend: str = "gloo",
           timeout_s: float = 60.0, pg_timeout_s: float | None = None,
           start_method: str = "forkserver") -> list[Any]:
    """Call ``fn(world: WorldInfo, *args)`` on ``nproc`` spawned processes; return their results by rank.

    ``fn`` must be importable by name (module-level), its args and result picklable. Raises
    ``LaunchError`` naming the first failing rank (with its traceback) or the timeout; in both cases
    every child has been terminated when it returns. ``backend='auto'`` picks nccl with CUDA
    (rank r on cuda:r) and gloo otherwise.

    ``forkserver`` (default) imports torch once in a server process and forks ranks from it: a launch
    costs milliseconds instead of seconds of ``import torch`` per rank, and stays CUDA-safe because the
    server never touches CUDA. ``spawn`` is the fallback for platforms without it.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    pg_timeout_s = timeout_s if pg_timeout_s is None else pg_timeout_s
    if start_method == "forkserver":
        multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "engine.parallel"])
    with tempfile.TemporaryDirectory(prefix="fd-launch-") as result_dir:
        ctx = tmp.start_processes(_worker, args=(fn, args, nproc, free_port(), backend, pg_timeout_s, result_dir),
                                  nprocs=nproc, join=False, daemon=True, start_method=start_method)
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=min(0.2, max(0.0, deadline - time.monotonic())), grace_period=2.0):
                if time.monotonic() >= deadline:
                    alive = [i for i, p in enumerate(ctx.processes) if p.is_alive()]
                    _stop(ctx.processes)
                    raise LaunchError(f"launch of {nproc} processes timed out after {timeout_s:.0f}s; "
                                      f"ranks still running: {alive} (all terminated)")
        except tmp.ProcessRaisedException as e:
            raise LaunchError(f"rank {e.error_index} of {nproc} raised; all ranks terminated.{e}") from None
        except tmp.ProcessExitedException as e:
            raise LaunchError(f"rank {e.error_index} of {nproc} died ({e}); all ranks terminated") from None
        return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False) for r in range(nproc)]


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + 2.0
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def main_or_exit(fn: Callable[..., Any], nproc: int, args: tuple = (), **kw) -> list[Any]:
    """``spawn_ranks`` for command lines: on failure print the clear message and exit 1 instead of a traceback."""
    try:
        return spawn_ranks(fn, nproc, args, **kw)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


__all__ = ["LaunchError", "WorldInfo", "free_port", "main_or_exit", "spawn_ranks"]
