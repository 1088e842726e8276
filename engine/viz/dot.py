"""The plan as Graphviz DOT, and Graphviz's own layout of it when ``dot`` is installed.

Boxes are HTML-like tables with one PORT cell per input and output, so Graphviz routes each
wire to the port it connects (the wan21_i2v_14b picture used to draw two wires from ``text``
on top of each other). Graphviz's spline router keeps edges out of boxes it does not connect;
``tests/test_viz_dot.py`` checks that on its computed layout. Context-parallel groups and
CUDA-graph segments are clusters (a frame); a node already framed keeps the second fact in its box.
"""
from __future__ import annotations

import html
import json
import shutil
import subprocess

from .layout import box_text
from .model import VizGraph
from .svg import BLOCK_HEAD, CPU_FILL, INPUT_FILL, SESSION_HEAD, _frame_colour, device_fills, heat


def available() -> bool:
    return shutil.which("dot") is not None


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _label(n, fill: str) -> str:
    e = html.escape
    bt = box_text(n)
    head = SESSION_HEAD if n.phase == "session" else BLOCK_HEAD
    rows = [f'<TR><TD COLSPAN="2" ALIGN="LEFT"><B>{e(bt.lines[0][0])}</B><BR ALIGN="LEFT"/>'
            f'<FONT POINT-SIZE="9">{e(bt.lines[1][0])}</FONT></TD></TR>']
    if n.kind == "input":
        return (f'<<TABLE BORDER="1" CELLBORDER="0" CELLSPACING="0" CELLPADDING="3" BGCOLOR="{INPUT_FILL}" '
                f'COLOR="#b08800" STYLE="rounded">{rows[0]}<TR><TD></TD><TD PORT="o_{e(n.out_ports[0])}"></TD></TR>'
                '</TABLE>>')
    for i in range(max(len(n.in_ports), len(n.out_ports))):
        ip = n.in_ports[i] if i < len(n.in_ports) else ""
        op = n.out_ports[i] if i < len(n.out_ports) else ""
        iport = f" PORT={_q('i_' + ip)}" if ip else ""
        oport = f" PORT={_q('o_' + op)}" if op else ""
        itext = f'<FONT COLOR="#11aa44" POINT-SIZE="9">{e(ip)}</FONT>' if ip else " "
        otext = f'<FONT COLOR="#1144aa" POINT-SIZE="9">{e(op)}</FONT>' if op else " "
        rows.append(f'<TR><TD ALIGN="LEFT"{iport}>{itext}</TD><TD ALIGN="RIGHT"{oport}>{otext}</TD></TR>')
    for text, _ in bt.lines[2:]:
        rows.append(f'<TR><TD COLSPAN="2" ALIGN="LEFT"><FONT POINT-SIZE="9">{e(text)}</FONT></TD></TR>')
    style = ' STYLE="rounded,dashed"' if n.offload else ' STYLE="rounded"'
    return (f'<<TABLE BORDER="2" CELLBORDER="0" CELLSPACING="0" CELLPADDING="2" BGCOLOR="{fill}" '
            f'COLOR="{head}"{style}>{"".join(rows)}</TABLE>>')


def to_dot(g: VizGraph) -> str:
    fills = device_fills(g)
    timed = [n.p50() for n in g.nodes.values() if n.timings_ms]
    hi = max(timed) if timed else 0.0
    lines = [f"digraph {_q(g.name)} {{",
             '  rankdir=LR; nodesep=0.35; ranksep=0.9; splines=spline; fontname="DejaVu Sans Mono";',
             '  node [shape=plain, fontname="DejaVu Sans Mono", fontsize=10];',
             '  edge [fontname="DejaVu Sans Mono", fontsize=8, color="#555555"];',
             f"  label={_q(g.name + ' — ' + g.description)}; labelloc=t; labeljust=l;"]
    framed: set[str] = set()
    for k, (title, members) in enumerate(g.groups().items()):
        free = [m for m in members if m not in framed]
        if not free:
            continue
        c = _frame_colour(title)
        lines.append(f"  subgraph cluster_{k} {{ label={_q(title)}; style=dashed; color={_q(c)}; fontcolor={_q(c)};")
        for m in free:
            lines.append(f"    {_q(m)};")
        lines.append("  }")
        framed.update(free)
    for n in g.nodes.values():
        fill = heat(n.p50(), hi) if n.timings_ms else fills.get(n.device, CPU_FILL)
        tip = f"{n.name} ({n.type_name})" + (f" — {n.where}" if n.where else "")
        lines.append(f"  {_q(n.name)} [label={_label(n, fill)}, tooltip={_q(tip)}];")
    for ed in g.edges:
        tip = f"{ed.src}.{ed.src_port} → {ed.dst}.{ed.dst_port}: {ed.type}" + (f" {ed.doc}" if ed.doc else "")
        lines.append(f"  {_q(ed.src)}:{_q('o_' + ed.src_port)}:e -> {_q(ed.dst)}:{_q('i_' + ed.dst_port)}:w "
                     f"[label={_q(ed.type)}, tooltip={_q(tip)}];")
    lines.append(_legend(g, fills))
    lines.append("}")
    return "\n".join(lines) + "\n"


def _legend(g: VizGraph, fills: dict) -> str:
    e = html.escape
    rows = [f'<TR><TD BGCOLOR="{c}" WIDTH="16"></TD><TD ALIGN="LEFT">device {e(d)}</TD></TR>' for d, c in fills.items()]
    rows.append(f'<TR><TD BGCOLOR="{INPUT_FILL}"></TD><TD ALIGN="LEFT">graph input (spec inputs.*)</TD></TR>')
    rows.append(f'<TR><TD BGCOLOR="{SESSION_HEAD}"></TD><TD ALIGN="LEFT">border: runs once per session</TD></TR>')
    rows.append(f'<TR><TD BGCOLOR="{BLOCK_HEAD}"></TD><TD ALIGN="LEFT">border: runs every block</TD></TR>')
    rows.append('<TR><TD>- -</TD><TD ALIGN="LEFT">dashed border: offload after running</TD></TR>')
    for title in sorted({t.split(":")[0] if t.startswith("context") else "CUDA graph segment" for t in g.groups()}):
        rows.append(f'<TR><TD><FONT COLOR="{_frame_colour(title)}">[ ]</FONT></TD>'
                    f'<TD ALIGN="LEFT">dashed frame: {e(title)}</TD></TR>')
    rows.append('<TR><TD>→</TD><TD ALIGN="LEFT">wire out-port → in-port, labelled with its type</TD></TR>')
    return (f'  legend [label=<<TABLE BORDER="1" CELLBORDER="0" CELLSPACING="2" COLOR="#cccccc">'
            f'<TR><TD COLSPAN="2" ALIGN="LEFT"><B>legend</B></TD></TR>{"".join(rows)}</TABLE>>];')


def run_dot(dot_text: str, fmt: str) -> str:
    """``dot -T<fmt>`` of ``dot_text``; raises OSError / SubprocessError when Graphviz fails."""
    return subprocess.run(["dot", f"-T{fmt}"], input=dot_text, capture_output=True, text=True, check=True,
                          timeout=60).stdout


def dot_json(g: VizGraph) -> dict:
    return json.loads(run_dot(to_dot(g), "json"))
