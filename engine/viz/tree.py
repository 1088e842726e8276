"""The terminal view of a plan (``fd viz spec`` with no ``-o``): a rich tree that reads in 100 columns.

Phases are the branches (graph inputs, once per session, every block) because that is the
first thing to know about how a spec runs; each node lists its wires and the plan's facts.
"""
from __future__ import annotations

from rich.markup import escape

from .layout import box_text
from .model import VizGraph


def to_tree(g: VizGraph):
    from rich.tree import Tree

    root = Tree(f"[bold]{escape(g.name)}[/] — {escape(g.file)}")
    incoming: dict[str, list] = {}
    for e in g.edges:
        incoming.setdefault(e.dst, []).append(e)
    for phase, title in (("input", "graph inputs"), ("session", "once per session"), ("block", "every block")):
        names = [n for n, v in g.nodes.items() if v.phase == phase]
        if not names:
            continue
        branch = root.add(f"[cyan]{title}[/]")
        for n in names:
            v = g.nodes[n]
            if v.kind == "input":
                branch.add(f"[bold]{escape(n)}[/]: {escape(box_text(v).lines[1][0])}")
                continue
            t = branch.add(f"[bold]{escape(n)}[/] ({escape(v.type_name)}) on {escape(v.device)}"
                           + (" · offload" if v.offload else ""))
            wires = ", ".join(f"{e.dst_port}←{_src(g, e)}" for e in incoming.get(n, [])) or "no inputs"
            t.add(f"in: {escape(wires)}")
            t.add(f"placement: {escape(v.device_reason)}")
            t.add(f"capture: {'yes' if v.captured else 'no'} — {escape(v.capture_reason)}")
            for text, _ in box_text(v).lines[2:]:
                if not text.startswith(("device ", "CUDA graph")):
                    t.add(escape(text.strip()))
    return root


def _src(g: VizGraph, e) -> str:
    return e.src if g.nodes[e.src].kind == "input" else f"{e.src}.{e.src_port}"
