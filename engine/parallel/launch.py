"""Run a function on N local processes joined in one process group (tests, ``fd exec --nproc N``).

The failure mode that matters is the hang: one rank raises, its peers sit in a collective waiting
for it forever. Three layers prevent that: the parent watches every child and, as soon as one exits
non-zero, terminates the rest and raises naming the rank that failed FIRST (its peers then fail too,
with "connection reset" noise that must not hide the cause); the process group is created with a
timeout, so a collective whose peer vanished fails by itself; and the whole launch has a deadline
after which every child is killed. Children also die with their parent (PR_SET_PDEATHSIG on Linux).
"""
from __future__ import annotations

import ctypes
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

from .groups import WorldInfo, init_distributed


class LaunchError(RuntimeError):
    """A launched rank failed, died, or the launch ran past its timeout."""


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral TCP port that is free right now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(rank: int, fn: Callable, args: tuple, nproc: int, port: int, backend: str,
            pg_timeout_s: float, run_dir: str) -> None:
    _die_with_parent()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        world = init_distributed(backend, timeout_s=pg_timeout_s)
        result = fn(world, *args)
        torch.save(result, os.path.join(run_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        # The wall-clock time orders failures across ranks: the earliest is the cause.
        # Written whole then renamed: the parent may terminate this rank while it writes.
        path = os.path.join(run_dir, f"rank{rank}.err")
        with open(path + ".tmp", "w") as f:
            json.dump({"time": time.time(), "trace": traceback.format_exc()}, f)
        os.replace(path + ".tmp", path)
        sys.exit(1)


def spawn_ranks(fn: Callable[..., Any], nproc: int, args: tuple = (), backend: str = "gloo",
                timeout_s: float = 60.0, pg_timeout_s: float | None = None,
                start_method: str = "forkserver") -> list[Any]:
    """Call ``fn(world: WorldInfo, *args)`` on ``nproc`` local processes; return their results by rank.

    ``fn`` must be importable by name (module-level), its args and result picklable. Raises
    ``LaunchError`` naming the rank that failed first (with its traceback), one that died without an
    exception, or the timeout; every child has been ended when it raises. ``backend='auto'`` picks
    nccl with CUDA (rank r on cuda:r) and gloo otherwise; MASTER_ADDR is 127.0.0.1 on a free port.

    ``forkserver`` (default) imports torch once in a server process and forks ranks from it: a launch
    costs milliseconds instead of seconds of ``import torch`` per rank, and stays CUDA-safe because the
    server never touches CUDA. ``spawn`` is the fallback for platforms without it.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    pg_timeout_s = timeout_s if pg_timeout_s is None else pg_timeout_s
    if start_method == "forkserver":
        multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "engine.parallel"])
    mp = multiprocessing.get_context(start_method)
    with tempfile.TemporaryDirectory(prefix="fd-launch-") as run_dir:
        port = free_port()
        procs = [mp.Process(target=_worker, args=(r, fn, args, nproc, port, backend, pg_timeout_s, run_dir),
                            daemon=True, name=f"fd-rank{r}") for r in range(nproc)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        try:
            failed = _watch(procs, deadline)
        except BaseException:                                              # KeyboardInterrupt included
            _stop(procs)
            raise
        if failed is None:
            alive = [r for r, p in enumerate(procs) if p.is_alive()]
            _stop(procs)
            raise LaunchError(f"launch of {nproc} processes timed out after {timeout_s:.0f}s; "
                              f"ranks still running: {alive} (all terminated)")
        if failed:
            exitcodes = {r: procs[r].exitcode for r in failed}
            _stop(procs)
            raise LaunchError(_describe_failure(exitcodes, run_dir, nproc))
        return [torch.load(os.path.join(run_dir, f"rank{r}.pt"), weights_only=False) for r in range(nproc)]


def _watch(procs, deadline: float) -> list[int] | None:
    """Wait until all ranks exit cleanly ([]), one fails (the failed ranks), or the deadline (None)."""
    pending = set(range(len(procs)))
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        multiprocessing.connection.wait([procs[r].sentinel for r in pending], timeout=min(left, 1.0))
        for r in [r for r in pending if not procs[r].is_alive()]:
            procs[r].join()
            pending.discard(r)
        failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if failed:
            return failed
    return []


def _describe_failure(exitcodes: dict[int, int], run_dir: str, nproc: int) -> str:
    """Name the cause: a rank that died without a Python exception (it cannot be a peer's echo),
    else the earliest recorded exception."""
    errors = {}
    for r in range(nproc):
        path = os.path.join(run_dir, f"rank{r}.err")
        if os.path.exists(path):
            with open(path) as f:
                errors[r] = json.load(f)
    hard = [r for r, code in sorted(exitcodes.items()) if r not in errors]
    if hard:
        r, code = hard[0], exitcodes[hard[0]]
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        msg = f"rank {r} of {nproc} died without a Python exception ({how}); all ranks terminated"
    else:
        r = min(errors, key=lambda k: errors[k]["time"])
        msg = f"rank {r} of {nproc} raised; all ranks terminated.\n\n-- rank {r} traceback:\n{errors[r]['trace']}"
    others = sorted(set(errors) - {r})
    if others:
        msg += f"\n(ranks {others} failed after it, as a consequence)"
    return msg


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
