"""`fd exec`: open the pipeline (engine.runner), load with a progress bar, stream blocks to the sinks, print a
summary. Under ``--nproc N`` it relaunches the same command on N local ranks."""
from __future__ import annotations

import json
import os
from statistics import median

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engine.errors import FdError

from .session_files import resume_inputs


def _with_hint(e, hint: str):
    from dataclasses import replace
    return replace(e, hint=f"{e.hint}; or {hint}" if e.hint else hint)


def _launch_local_ranks(nproc: int, rank_main) -> int:
    """``fd exec --nproc N``: the same command on N local processes joined in one process group (torch's
    launcher semantics: RANK/WORLD_SIZE/MASTER_ADDR set per rank); one failing rank ends them all."""
    import sys

    import torch

    from engine.errors import FdError
    from engine.parallel.launch import LaunchError, spawn_ranks

    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nproc else "gloo"
    try:
        spawn_ranks(rank_main, nproc, args=(sys.argv[1:],), backend=backend, timeout_s=7 * 24 * 3600,
                    pg_timeout_s=600)
    except LaunchError as e:
        raise FdError(f"fd exec --nproc {nproc}: {e}") from None
    return 0


def _check_save(args, plan) -> None:
    """Refuse ``--save-session`` up front where a snapshot cannot be taken (before hours of blocks)."""
    if getattr(args, "save_session", None) and plan.world_size > 1:
        raise FdError(f"--save-session: {plan.spec.file} runs context-parallel over {plan.world_size} ranks; "
                      "snapshots of such sessions are not supported (each rank holds only its share of the cache)")


def _read_resume(args, plan):
    """The ``--resume`` snapshot, checked against this spec before loading (None without the flag)."""
    if not getattr(args, "resume", None):
        return None
    from engine import snapshot
    snap = snapshot.read(args.resume)
    snapshot.check_compatible(snap, plan)
    return snap


def run_exec(args, rank_main=None) -> int:
    """``rank_main(world, argv)`` is what each local rank runs under ``--nproc N`` (fd's own ``main``)."""
    from engine.runner import open_pipeline

    if getattr(args, "nproc", 1) > 1 and "RANK" not in os.environ:
        return _launch_local_ranks(args.nproc, rank_main)
    pipe = open_pipeline(args.spec, args.overrides, args.set_files, out=getattr(args, "out", None))
    plan, rank = pipe.plan, pipe.rank
    if not getattr(args, "allow_cpu", False):
        from engine.errors import SpecErrors
        from engine.validate import cpu_fallback_warnings
        too_big = cpu_fallback_warnings(plan)
        if too_big:   # minutes of loading, then hours per block: ask first
            raise SpecErrors([_with_hint(e, "pass --allow-cpu to run it anyway") for e in too_big])
    console = Console(stderr=True, quiet=args.quiet or rank != 0)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=args.quiet or rank != 0) as progress:
        load_task = progress.add_task("loading", total=len(plan.order))

        def on_load(name, i, total):
            progress.update(load_task, completed=i, description=f"loading {name}" if name else "loaded")

        _check_save(args, plan)
        resume = _read_resume(args, plan)       # refused before any weight is read
        from engine.memory import fit_warnings
        for w in fit_warnings(plan) if rank == 0 else ():
            Console(stderr=True).print(f"[yellow]warning:[/] {w}", highlight=False)
        pipe.load(progress=on_load)
        n_blocks = pipe.blocks_to_run(args.blocks)   # a video input ends the run at its last chunk
        block_task = progress.add_task("blocks", total=n_blocks)
        from .interrupt import stop_after_block
        notice = Console(stderr=True, quiet=rank != 0)        # said even with --quiet: the run ends early
        done = 0
        with pipe.open_session() as session, stop_after_block(
                lambda: notice.print("[yellow]interrupted: finishing this block and writing what was generated "
                                      "(Ctrl-C again to discard it)[/]")) as stop:
            if resume is not None:
                session.restore(resume, **resume_inputs(plan.spec, args.overrides))
            for result in session.stream(n_blocks):
                done += 1
                ms = sum(result.timings_ms.values())
                progress.update(block_task, advance=1, description=f"block {result.block} ({ms:.0f} ms)")
                if stop.requested:
                    break
            saved, save_error = getattr(args, "save_session", None), None
            if saved and rank == 0:
                try:
                    session.snapshot(saved)
                except FdError as e:      # the video is still written: a long run is not thrown away
                    save_error = e
    summary = {"ok": True, "spec": plan.spec.file, "blocks": done, "interrupted": stop.requested,
               "first_block": session.block - done, "resumed_from": getattr(args, "resume", None),
               "saved_session": saved or None,
               "node_ms_median": {n: round(median(ms), 3) for n, ms in pipe.timings_ms.items() if ms},
               "outputs": {n: pipe.nodes[n].p.path for n in plan.sinks if hasattr(pipe.nodes[n].p, "path")}}
    if rank == 0:
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            for n, path in summary["outputs"].items():
                (notice if stop.requested else console).print(
                    f"[green]✓[/] {n}: wrote {path}" + (f" ({done} of {n_blocks} blocks: interrupted)"
                                                         if stop.requested else ""))
            if saved:
                console.print(f"[green]✓[/] session after block {session.block - 1}: saved {saved} "
                              f"(continue with --resume {saved})")
    if save_error is not None:
        raise FdError(f"--save-session {saved}: not saved: {save_error}")
    return 130 if stop.requested else 0
