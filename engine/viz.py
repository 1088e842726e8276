"""Drawing a plan: a rich tree for the terminal, and DOT / SVG / HTML files.

SVG and HTML need no system Graphviz: nodes are laid out in layers by their
topological generation. When a ``dot`` binary is present it does the SVG layout.
Every box shows what the plan decided: device, phase, capture, ring group, ms.
"""
from __future__ import annotations

import html
import shutil
import subprocess
from statistics import median

import networkx as nx

from .plan import Plan


def node_facts(plan: Plan, name: str, timings: dict | None = None) -> list[str]:
    np_ = plan.nodes[name]
    ms = (timings or {}).get(name)
    facts = [f"{np_.type_name}", f"device {np_.placement.device} · {np_.phase}"]
    facts.append(f"graph: {'captured' if np_.capture.captured else 'eager'}")
    if np_.parallel and np_.parallel.get("context", 1) > 1:
        facts.append(f"ring group: {np_.parallel['strategy']} × {np_.parallel['context']}")
    facts += np_.build().plan_facts()
    if ms:
        facts.append(f"{median(ms):.2f} ms/block")
    return facts


def to_rich_tree(plan: Plan, timings: dict | None = None):
    from rich.tree import Tree

    root = Tree(f"[bold]{plan.spec.name}[/] — {plan.spec.file}")
    for phase, names in (("once per session", plan.session_nodes), ("every block", plan.block_nodes)):
        branch = root.add(f"[cyan]{phase}[/]")
        for n in names:
            np_ = plan.nodes[n]
            wires = ", ".join(f"{p}←{r}" for p, r in np_.wires.items()) or "no inputs"
            t = branch.add(f"[bold]{n}[/] ({np_.type_name}) on {np_.placement.device}: {wires}")
            t.add(f"placement: {np_.placement.reason}")
            t.add(f"capture: {'yes' if np_.capture.captured else 'no'} — {np_.capture.reason}")
            for fact in np_.build().plan_facts():
                t.add(fact)
            if np_.parallel:
                t.add(f"parallel: context {np_.parallel['context']} ({np_.parallel['strategy']})")
            ms = (timings or {}).get(n)
            if ms:
                t.add(f"median {median(ms):.2f} ms over {len(ms)} calls")
    return root


def to_dot(plan: Plan, timings: dict | None = None) -> str:
    lines = [f'digraph "{plan.spec.name}" {{', "  rankdir=LR; node [shape=box, fontname=Helvetica];"]
    for phase, names in (("session", plan.session_nodes), ("block", plan.block_nodes)):
        lines.append(f'  subgraph "cluster_{phase}" {{ label="{phase} phase";')
        for n in names:
            label = "\\n".join([n] + node_facts(plan, n, timings)).replace('"', "'")
            lines.append(f'    "{n}" [label="{label}"];')
        lines.append("  }")
    for n, np_ in plan.nodes.items():
        for port, ref in np_.wires.items():
            src = "inputs" if ref.node == "inputs" else ref.node
            if src == "inputs":
                lines.append(f'  "inputs.{ref.port}" [shape=ellipse];')
                src = f"inputs.{ref.port}"
            etype = plan.graph.edges[ref.node, n]["type"] if ref.node != "inputs" else "input"
            lines.append(f'  "{src}" -> "{n}" [label="{ref.port}→{port} ({etype})"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_svg(plan: Plan, timings: dict | None = None) -> str:
    if shutil.which("dot"):
        try:
            return subprocess.run(["dot", "-Tsvg"], input=to_dot(plan, timings), capture_output=True, text=True,
                                  check=True, timeout=30).stdout
        except (subprocess.SubprocessError, OSError):
            pass
    return _svg_layered(plan, timings)


def _svg_layered(plan: Plan, timings: dict | None = None) -> str:
    box_w, box_h, gap_x, gap_y, pad = 250, 96, 90, 28, 20
    layers = list(nx.topological_generations(plan.graph))
    pos = {}
    for li, layer in enumerate(layers):
        for ri, n in enumerate(sorted(layer, key=plan.order.index)):
            pos[n] = (pad + li * (box_w + gap_x), pad + 30 + ri * (box_h + gap_y))
    width = pad * 2 + len(layers) * (box_w + gap_x)
    height = pad * 2 + 30 + max(len(layer) for layer in layers) * (box_h + gap_y)
    e = html.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="Helvetica, Arial, sans-serif" font-size="12">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
           f'<text x="{pad}" y="{pad + 8}" font-size="15" font-weight="bold">{e(plan.spec.name)}</text>']
    for u, v, data in plan.graph.edges(data=True):
        (x1, y1), (x2, y2) = pos[u], pos[v]
        x1, y1, x2, y2 = x1 + box_w, y1 + box_h / 2, x2, y2 + box_h / 2
        mx = (x1 + x2) / 2
        out.append(f'<path d="M{x1},{y1} C{mx},{y1} {mx},{y2} {x2},{y2}" fill="none" stroke="#555" '
                   f'marker-end="url(#arrow)"/>')
        out.append(f'<text x="{mx}" y="{(y1 + y2) / 2 - 4}" text-anchor="middle" fill="#333" font-size="10">'
                   f'{e(data["src_port"])}→{e(data["port"])} ({e(data["type"])})</text>')
    for n, (x, y) in pos.items():
        np_ = plan.nodes[n]
        fill = "#e8f1ff" if np_.phase == "session" else ("#e9f9ec" if not np_.node.is_sink else "#fff4e0")
        stroke = "#c0392b" if np_.capture.captured else "#667"
        out.append(f'<g class="node" id="node-{e(n)}"><rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" '
                   f'rx="8" fill="{fill}" stroke="{stroke}" stroke-width="{2 if np_.capture.captured else 1}"/>')
        out.append(f'<text x="{x + 10}" y="{y + 18}" font-weight="bold">{e(n)}</text>')
        for i, fact in enumerate(node_facts(plan, n, timings)):
            out.append(f'<text x="{x + 10}" y="{y + 36 + i * 14}">{e(fact)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def to_html(plan: Plan, timings: dict | None = None) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(plan.spec.name)}</title></head>"
            f"<body><h1>{html.escape(plan.spec.name)}</h1><p>{html.escape(plan.spec.description)}</p>"
            f"{to_svg(plan, timings)}<pre>{html.escape(to_dot(plan, timings))}</pre></body></html>\n")
