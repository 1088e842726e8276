"""`fd exec`: plan, load with a progress bar, stream blocks to the sinks, print a summary."""
from __future__ import annotations

import json
import os
from statistics import median

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def main_sink_name(spec) -> str | None:
    sinks = [n for n, ns in spec.nodes.items() if ns.is_sink]
    for n in sinks:
        if spec.nodes[n].main is True:
            return n
    for n in sinks:
        if spec.nodes[n].type == "sink.mp4":
            return n
    return sinks[0] if sinks else None


def _with_hint(e, hint: str):
    from dataclasses import replace
    return replace(e, hint=f"{e.hint}; or {hint}" if e.hint else hint)


def resolve_spec(args):
    """The spec with overrides applied, ``--out`` turned into an override of the main sink's path."""
    from engine.errors import FdError
    from engine.spec import load_spec

    overrides = list(args.overrides)
    spec = load_spec(args.spec, overrides, args.set_files)
    if getattr(args, "out", None):
        from pathlib import Path
        if not Path(args.out).expanduser().parent.is_dir():   # a typo'd folder is not created behind the user's back
            raise FdError(f"--out {args.out}: the folder {Path(args.out).expanduser().parent} does not exist")
        main = main_sink_name(spec)
        if main is None:
            raise FdError(f"{spec.file}: --out given but the spec has no sink")
        overrides.append(f"sinks.{main}.params.path={args.out}")
        spec = load_spec(args.spec, overrides, args.set_files)
    return spec


def _exec_on_rank(world, argv: list[str]) -> int:
    from flashdreams_cli.main import main
    rc = main(argv)
    if rc:
        raise SystemExit(rc)
    return rc


def _launch_local_ranks(nproc: int) -> int:
    """``fd exec --nproc N``: the same command on N local processes joined in one process group (torch's
    launcher semantics: RANK/WORLD_SIZE/MASTER_ADDR set per rank); one failing rank ends them all."""
    import sys

    import torch

    from engine.errors import FdError
    from engine.parallel.launch import LaunchError, spawn_ranks

    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nproc else "gloo"
    try:
        spawn_ranks(_exec_on_rank, nproc, args=(sys.argv[1:],), backend=backend, timeout_s=7 * 24 * 3600,
                    pg_timeout_s=600)
    except LaunchError as e:
        raise FdError(f"fd exec --nproc {nproc}: {e}") from None
    return 0


def run_exec(args) -> int:
    from engine import Registry
    from engine.plan import make_plan
    from engine.session import Pipeline

    if getattr(args, "nproc", 1) > 1 and "RANK" not in os.environ:
        return _launch_local_ranks(args.nproc)
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world_size > 1:
        from engine.parallel.groups import init_distributed
        init_distributed()
    spec = resolve_spec(args)
    plan = make_plan(spec, Registry.default(), world_size=world_size)
    if not getattr(args, "allow_cpu", False):
        from engine.errors import SpecErrors
        from engine.validate import cpu_fallback_warnings
        too_big = cpu_fallback_warnings(plan)
        if too_big:   # minutes of loading, then hours per block: ask first
            raise SpecErrors([_with_hint(e, "pass --allow-cpu to run it anyway") for e in too_big])
    pipe = Pipeline(plan, rank=rank)
    console = Console(stderr=True, quiet=args.quiet or rank != 0)
    n_blocks = args.blocks if args.blocks is not None else int(plan.spec.inputs.get("num_blocks", 1))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, disable=args.quiet or rank != 0) as progress:
        load_task = progress.add_task("loading", total=len(plan.order))

        def on_load(name, i, total):
            progress.update(load_task, completed=i, description=f"loading {name}" if name else "loaded")

        pipe.load(progress=on_load)
        block_task = progress.add_task("blocks", total=n_blocks)
        from .interrupt import stop_after_block
        notice = Console(stderr=True, quiet=rank != 0)        # said even with --quiet: the run ends early
        done = 0
        with pipe.open_session() as session, stop_after_block(
                lambda: notice.print("[yellow]interrupted: finishing this block and writing what was generated "
                                      "(Ctrl-C again to discard it)[/]")) as stop:
            for result in session.stream(n_blocks):
                done += 1
                ms = sum(result.timings_ms.values())
                progress.update(block_task, advance=1, description=f"block {result.block} ({ms:.0f} ms)")
                if stop.requested:
                    break
    summary = {"ok": True, "spec": plan.spec.file, "blocks": done, "interrupted": stop.requested,
               "node_ms_median": {n: round(median(p.timings_ms), 3) for n, p in plan.nodes.items() if p.timings_ms},
               "outputs": {n: plan.nodes[n].node.p.path for n in plan.sinks if hasattr(plan.nodes[n].node.p, "path")}}
    if rank == 0:
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            for n, path in summary["outputs"].items():
                (notice if stop.requested else console).print(
                    f"[green]✓[/] {n}: wrote {path}" + (f" ({done} of {n_blocks} blocks: interrupted)"
                                                         if stop.requested else ""))
    return 130 if stop.requested else 0
