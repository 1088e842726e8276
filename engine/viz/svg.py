"""Drawing a Layout as SVG: boxes coloured by device, frames, port names, edge labels, a legend.

Drawing order is frames, edges, boxes, then edge labels on a white halo, so a label is never
covered by anything. Every node and edge carries ``data-*`` attributes and a ``<title>`` so the
HTML view can make them interactive without a second renderer.
"""
from __future__ import annotations

import html
import json

from .layout import FONT, LABEL_FONT, LINE, PAD, ROW, Layout, Rect, _SIZES, fmt_bytes, layout, text_width
from .model import VizGraph

MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"
DEVICE_FILLS = ["#dce9ff", "#e6dcff", "#d8f3ec", "#ffe3d6", "#f6dcef", "#e8f0d0", "#d9eef8", "#f4ecd2"]
CPU_FILL, INPUT_FILL = "#eeeeee", "#fffbe6"
SESSION_HEAD, BLOCK_HEAD = "#7a5cc2", "#2e8b57"
FRAME_COLOURS = {"context": "#1f6feb", "CUDA": "#d1242f"}


def device_fills(g: VizGraph) -> dict[str, str]:
    devs = sorted({n.device for n in g.nodes.values() if n.kind == "node"})
    fills, k = {}, 0
    for d in devs:
        if d.startswith("cuda"):
            fills[d] = DEVICE_FILLS[k % len(DEVICE_FILLS)]
            k += 1
        else:
            fills[d] = CPU_FILL
    return fills


def heat(ms: float, hi: float) -> str:
    """White -> amber -> salmon as ms goes 0 -> hi; light enough that black text stays readable."""
    t = 0.0 if hi <= 0 else max(0.0, min(1.0, ms / hi))
    stops = [(255, 255, 255), (255, 214, 120), (250, 128, 100)]
    a, b = (stops[0], stops[1]) if t < 0.5 else (stops[1], stops[2])
    u = t * 2 if t < 0.5 else (t - 0.5) * 2
    return "#" + "".join(f"{round(x + (y - x) * u):02x}" for x, y in zip(a, b))


def _frame_colour(title: str) -> str:
    return next((c for k, c in FRAME_COLOURS.items() if title.startswith(k)), "#555")


def render(g: VizGraph, lay: Layout | None = None) -> str:
    lay = lay or layout(g)
    e = html.escape
    fills = device_fills(g)
    timed = [n.p50() for n in g.nodes.values() if n.timings_ms]
    hi = max(timed) if timed else 0.0
    legend = _legend(g, fills, bool(timed), hi, lay.height)
    width = max(lay.width, legend[1])
    height = lay.height + legend[2]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{MONO}" font-size="{FONT}">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
           f'<rect width="{width:.0f}" height="{height:.0f}" fill="white" pointer-events="none"/>',
           f'<text x="24" y="30" font-size="15" font-weight="bold">{e(g.name)}</text>',
           f'<text x="24" y="46" font-size="11" fill="#555">{e(g.description)}</text>']
    for f in lay.frames:
        c = _frame_colour(f.title)
        members = html.escape(json.dumps(f.members), quote=True)
        out.append(f'<g class="frame" data-members="{members}"><rect x="{f.rect.x:.1f}" y="{f.rect.y:.1f}" width="{f.rect.w:.1f}" '
                   f'height="{f.rect.h:.1f}" rx="10" fill="none" stroke="{c}" stroke-width="1.5" '
                   f'stroke-dasharray="6 3"/><text x="{f.rect.x + 4:.1f}" y="{f.rect.y - 4:.1f}" font-size="10" '
                   f'fill="{c}">{e(f.title)}</text></g>')
    for i, re_ in enumerate(lay.edges):
        ed = re_.edge
        tip = f"{ed.src}.{ed.src_port} → {ed.dst}.{ed.dst_port}\ntype: {ed.type}" + (f"\n{ed.doc}" if ed.doc else "")
        out.append(f'<g class="edge" data-edge="{i}" data-src="{e(ed.src)}" data-dst="{e(ed.dst)}">'
                   f'<title>{e(tip)}</title><path d="{_path(re_)}" fill="none" stroke="#555" stroke-width="1.3" '
                   f'marker-end="url(#arrow)"/><path d="{_path(re_)}" fill="none" stroke="transparent" '
                   f'stroke-width="9"/></g>')
    for name, b in lay.boxes.items():
        out.append(_box(g.nodes[name], b, lay, fills, hi))
    for re_ in lay.edges:
        r = re_.label_rect
        out.append(f'<text class="edge-label" x="{r.right:.1f}" y="{r.bottom - 2:.1f}" text-anchor="end" '
                   f'font-size="{LABEL_FONT}" fill="#333" stroke="white" stroke-width="3" paint-order="stroke">'
                   f'{e(re_.label)}</text>')
    out.append(legend[0])
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _path(re_) -> str:
    pts = re_.points
    d = [f"M{pts[0][0]:.1f},{pts[0][1]:.1f}"]
    for i in range(len(pts) - 1):
        (x0, y0), (x1, y1) = pts[i], pts[i + 1]
        if i in re_.curved and y0 != y1:
            mx = (x0 + x1) / 2
            d.append(f"C{mx:.1f},{y0:.1f} {mx:.1f},{y1:.1f} {x1:.1f},{y1:.1f}")
        else:
            d.append(f"L{x1:.1f},{y1:.1f}")
    return " ".join(d)


def _box(n, b: Rect, lay: Layout, fills: dict, hi: float) -> str:
    e = html.escape
    bt = lay.texts[n.name]
    if n.kind == "input":
        fill, head = INPUT_FILL, "#b08800"
    else:
        fill = heat(n.p50(), hi) if n.timings_ms else fills.get(n.device, CPU_FILL)
        head = SESSION_HEAD if n.phase == "session" else BLOCK_HEAD
    dash = ' stroke-dasharray="5 3"' if n.offload else ""
    out = [f'<g class="node" id="node-{e(n.name)}" data-node="{e(n.name)}">',
           f'<title>{e(n.name)} ({e(n.type_name)})</title>',
           f'<rect x="{b.x:.1f}" y="{b.y:.1f}" width="{b.w:.1f}" height="{b.h:.1f}" rx="6" fill="{fill}" '
           f'stroke="{head}" stroke-width="{1.8 if n.kind == "node" else 1.2}"{dash}/>',
           f'<rect x="{b.x:.1f}" y="{b.y:.1f}" width="5" height="{b.h:.1f}" fill="{head}"/>']
    y = b.y + PAD
    head_lines, tail = bt.lines[:2], bt.lines[2:]
    for text, style in head_lines:
        y += LINE
        weight = ' font-weight="bold"' if style == "title" else ""
        out.append(f'<text x="{b.x + PAD:.1f}" y="{y - 3:.1f}" font-size="{_SIZES[style]}"{weight}>{e(text)}</text>')
    if n.kind == "node":
        for i, p in enumerate(n.in_ports):
            py = lay.ports[(n.name, "in", p)][1]
            out.append(f'<circle cx="{b.x:.1f}" cy="{py:.1f}" r="2.5" fill="#555"/>'
                       f'<text x="{b.x + 8:.1f}" y="{py + 4:.1f}" font-size="{FONT - 1}" fill="#1a4">{e(p)}</text>')
        for i, p in enumerate(n.out_ports):
            py = lay.ports[(n.name, "out", p)][1]
            out.append(f'<circle cx="{b.right:.1f}" cy="{py:.1f}" r="2.5" fill="#555"/>'
                       f'<text x="{b.right - 8:.1f}" y="{py + 4:.1f}" text-anchor="end" font-size="{FONT - 1}" '
                       f'fill="#14a">{e(p)}</text>')
        y = b.y + bt.ports_top + bt.n_rows * ROW
    for text, style in tail:
        y += LINE
        out.append(f'<text x="{b.x + PAD:.1f}" y="{y - 3:.1f}" font-size="{_SIZES[style]}" fill="#333">{e(text)}</text>')
    out.append("</g>")
    return "".join(out)


def _legend(g: VizGraph, fills: dict, timed: bool, hi: float, top: float) -> tuple[str, float, float]:
    """(svg, width, height) of the legend drawn under the graph; lists only what the drawing uses."""
    e = html.escape
    rows: list[tuple[str, str]] = []          # (swatch svg at x=0..18, y centred on 0, text)
    for d, c in fills.items():
        rows.append((f'<rect x="0" y="-6" width="18" height="12" fill="{c}" stroke="#999"/>', f"device {d}"))
    if any(n.kind == "input" for n in g.nodes.values()):
        rows.append((f'<rect x="0" y="-6" width="18" height="12" fill="{INPUT_FILL}" stroke="#b08800"/>',
                     "graph input (spec inputs.*)"))
    rows.append((f'<rect x="0" y="-6" width="5" height="12" fill="{SESSION_HEAD}"/>', "runs once per session"))
    rows.append((f'<rect x="0" y="-6" width="5" height="12" fill="{BLOCK_HEAD}"/>', "runs every block"))
    if any(n.offload for n in g.nodes.values()):
        rows.append(('<rect x="0" y="-6" width="18" height="12" fill="none" stroke="#555" stroke-dasharray="5 3"/>',
                     "offload: weights leave the device after running"))
    titles = {f.split(":")[0] if f.startswith("context") else "CUDA graph segment" for f in g.groups()}
    for t in sorted(titles):
        c = _frame_colour(t)
        rows.append((f'<rect x="0" y="-6" width="18" height="12" rx="3" fill="none" stroke="{c}" '
                     f'stroke-dasharray="6 3"/>', "frame: " + t))
    rows.append(('<path d="M0,0 L18,0" stroke="#555" marker-end="url(#arrow)"/>',
                 "wire: out-port → in-port, labelled with its type"))
    if timed:
        rows.append((''.join(f'<rect x="{i * 4.5:.1f}" y="-6" width="4.5" height="12" fill="{heat(hi * i / 3, hi)}"/>'
                             for i in range(4)), f"fill: measured p50 ms, 0 → {hi:.2f} ms"))
    y0 = top + 10
    w = max(text_width(t, 11) for _, t in rows) + 60
    h = 26 + len(rows) * 17 + 10
    out = [f'<g class="legend" transform="translate(24,{y0:.1f})"><rect x="0" y="0" width="{w:.0f}" height="{h}" '
           'fill="#fafafa" stroke="#ccc" rx="6"/><text x="10" y="17" font-weight="bold" font-size="11">legend</text>']
    for i, (sw, text) in enumerate(rows):
        yy = 34 + i * 17
        out.append(f'<g transform="translate(10,{yy})">{sw}</g><text x="36" y="{yy + 4}" font-size="11">{e(text)}</text>')
    out.append("</g>")
    return "".join(out), w + 48, h + 20
