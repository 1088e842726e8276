"""`fd plan`: the memory plan of a spec (engine/memory.py) as a table, with a fit check and suggestions.

Nothing is loaded: the point is to learn that a spec will not fit before minutes of loading end in an
out-of-memory kill. Exit 0 when it fits (or no budget was given), 3 when it does not.
"""
from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

NO_FIT = 3


def add_parser(sub, spec_args) -> None:
    p = sub.add_parser("plan", help="the memory plan of a spec: bytes per node and device, before loading anything")
    spec_args(p)
    p.add_argument("--device", help="check the fit on this GPU (h100, h200, a100, l40s, rtx4090, ...); nodes not "
                   "pinned to the CPU are costed on it")
    p.add_argument("--memory", help="check the fit against this budget, e.g. 24GiB")


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f}" if b else "-"


def run_plan(args) -> int:
    from engine import load_plan
    from engine.memory import memory_plan

    plan = load_plan(args.spec, args.overrides, args.set_files, check_devices=False)
    mp = memory_plan(plan, device=args.device, memory=args.memory)
    if args.json:
        print(json.dumps({"ok": True, "spec": plan.spec.file, **mp.to_json()}, indent=2))
        return NO_FIT if mp.fits is False else 0
    out = Console()
    t = Table("node", "type", "device", "weights GiB", "how", "state GiB", "activations GiB", title=plan.spec.name)
    for n in mp.nodes:
        if n.type_name.startswith("sink."):
            continue
        t.add_row(n.node, n.type_name, n.device, _gib(n.weights) + (" (offloaded)" if n.offload else ""),
                  n.weights_source, _gib(n.state), _gib(n.activations + n.graph_pool))
    out.print(t)
    for dev, b in mp.peaks.items():
        out.print(f"peak on {dev}: [bold]{b / 2**30:.2f} GiB[/]")
    for n in mp.nodes:
        if n.state_what:
            out.print(f"  {n.node}: {n.state_what}", highlight=False)
    if mp.fits is None:
        return 0
    if mp.fits:
        out.print(f"[green]✓[/] fits {mp.budget_name} ({mp.budget / 2**30:.1f} GiB)")
        return 0
    out.print(f"[red]✗[/] does not fit {mp.budget_name} ({mp.budget / 2**30:.1f} GiB); what would help:")
    for s in mp.suggestions:
        out.print(f"  - {s}", highlight=False)
    return NO_FIT
