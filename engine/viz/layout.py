"""A left-to-right layered layout of a VizGraph, with edges that never cross a box.

Layering and the order of nodes inside a layer come from grandalf's Sugiyama layout (crossing
reduction, Brandes-Köpf placement); we do not hand-roll those. What grandalf does not know is
our boxes' ports, so edges are routed here, in a way that makes "no edge through a box" true
by construction rather than by luck:

* each layer is a column: a *lane* (where the labels of edges entering that column sit) and a
  *band* (where its boxes sit, left-aligned). Between two columns is an empty *gap*.
* an edge leaves its box at the output port, runs horizontally to the end of the band, crosses
  the gap (the only place it may move vertically), then runs horizontally through every column
  it skips at the height of its grandalf dummy vertex (which grandalf spaced apart from that
  column's boxes), and finally enters its target through the lane at the input port's height.

Horizontal runs inside a column stay inside the vertical span of their own box or dummy, and
boxes and dummies in a column never overlap vertically (we enforce a minimum gap after
grandalf), so no segment can enter a box it does not connect. Text sizes are estimated for a
monospace font, so boxes are sized to their text and labels are not clipped.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

from .model import VEdge, VizGraph

FONT = 12                 # body font size (px); monospace, so width = chars * CHAR * size
CHAR = 0.62               # advance of one monospace character, in font sizes (DejaVu Sans Mono: 0.602)
ROW = 18                  # vertical pitch of port rows
LINE = 15                 # vertical pitch of fact lines
PAD = 10                  # inner padding of a box
SEP = 40                  # minimum vertical gap between two items of a column
DUMMY = 10                # vertical extent reserved for an edge passing through a column
GAP = 80                  # empty horizontal gap between a band and the next lane
LABEL_FONT = 10
MARGIN = 24


def columns(text: str) -> int:
    """Monospace columns of ``text``: East Asian wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def clip(text: str, cols: int) -> str:
    """``text`` cut to at most ``cols`` columns, with an ellipsis when cut."""
    if columns(text) <= cols:
        return text
    out, used = [], 1
    for c in text:
        used += columns(c)
        if used > cols:
            break
        out.append(c)
    return "".join(out) + "…"


def text_width(text: str, size: float = FONT) -> float:
    return columns(text) * CHAR * size


@dataclass
class Rect:
    x: float
    y: float
    w: float
    h: float

    @property
    def right(self) -> float:
        return self.x + self.w

    @property
    def bottom(self) -> float:
        return self.y + self.h

    def intersects(self, o: "Rect", eps: float = 0.0) -> bool:
        return (self.x < o.right - eps and o.x < self.right - eps and self.y < o.bottom - eps and o.y < self.bottom - eps)

    def grow(self, d: float) -> "Rect":
        return Rect(self.x - d, self.y - d, self.w + 2 * d, self.h + 2 * d)


@dataclass
class BoxText:
    lines: list[tuple[str, str]]       # (text, style): "title" | "sub" | "fact" — drawn top to bottom
    ports_top: float                   # offset of the first port row below the box top
    n_rows: int


@dataclass
class RoutedEdge:
    edge: VEdge
    points: list[tuple[float, float]]   # polyline; segment i -> i+1
    curved: set[int]                    # indices of segments drawn as S-curves (those crossing a gap)
    label: str
    label_rect: Rect


@dataclass
class Frame:
    title: str
    rect: Rect
    members: list[str]


@dataclass
class Layout:
    boxes: dict[str, Rect]
    texts: dict[str, BoxText]
    ports: dict[tuple[str, str, str], tuple[float, float]]   # (node, "in"|"out", port) -> point on the box side
    edges: list[RoutedEdge]
    frames: list[Frame] = field(default_factory=list)
    width: float = 0.0
    height: float = 0.0


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def box_text(n) -> BoxText:
    """The lines a box shows; sizing and drawing both read this, so they cannot disagree."""
    if n.kind == "input":
        value = clip(str(n.params.get("value")), 30)
        return BoxText([(n.name, "title"), (f"{n.type_name} = {value}", "sub")], 0.0, 1)
    sub = f"{n.type_name} · {'once per session' if n.phase == 'session' else 'every block'}"
    facts = [f"device {n.device}" + (" · offload" if n.offload else "")]
    facts.append("CUDA graph: captured" if n.captured else "CUDA graph: eager")
    par = n.parallel or {}
    if int(par.get("context", 1)) > 1:
        facts.append(f"context parallel: {par.get('strategy', 'ring')} × {par['context']}")
    if n.kv:
        facts.append(f"KV cache: sink {n.kv['sink_frames']} · window {n.kv['window_frames']} frames")
        facts.append(f"  {n.kv['dtype']} · {fmt_bytes(n.kv['bytes'])}")
    facts += list(getattr(n, "notes", ()))
    if n.est_bytes:
        facts.append(f"weights ≈ {fmt_bytes(n.est_bytes)}")
    if n.timings_ms:
        per = "ms/block" if n.phase == "block" else "ms/call"
        facts.append(f"p50 {n.p50():.2f} ms · p99 {n.p99():.2f} {per} (n={len(n.timings_ms)})")
    return BoxText([(n.name, "title"), (sub, "sub"), *[(f, "fact") for f in facts]], 0.0,
                   max(len(n.in_ports), len(n.out_ports)))


_SIZES = {"title": FONT + 1, "sub": FONT - 1, "fact": FONT - 1}


def _size_box(n, bt: BoxText) -> tuple[float, float]:
    head, tail = bt.lines[:2], bt.lines[2:]
    w = max(text_width(t, _SIZES[s]) for t, s in bt.lines)
    for i in range(bt.n_rows):
        left = n.in_ports[i] if i < len(n.in_ports) else ""
        right = n.out_ports[i] if i < len(n.out_ports) else ""
        w = max(w, text_width(f"{left}  {right}", FONT - 1) + 12)
    bt.ports_top = PAD + len(head) * LINE + 4
    h = bt.ports_top + bt.n_rows * ROW + len(tail) * LINE + PAD
    if n.kind == "input":
        h = bt.ports_top + PAD - 2
    return w + 2 * PAD, h


def _port_y(n, bt: BoxText, top: float, idx: int) -> float:
    if n.kind == "input":
        return top + bt.ports_top / 2 + 4
    return top + bt.ports_top + idx * ROW + ROW / 2


def _grandalf_order(g: VizGraph, sizes: dict[str, tuple[float, float]]):
    """Ranks and in-rank positions from grandalf; returns ({node: rank}, {node: y}, {(edge idx, rank): y})."""
    from grandalf.graphs import Edge, Graph, Vertex
    from grandalf.layouts import SugiyamaLayout

    class _View:                       # grandalf lays out top-down: its w is our height (transposed)
        def __init__(self, w=0.0, h=0.0):
            self.w, self.h, self.xy = w, h, (0.0, 0.0)

    class _EView:
        def setpath(self, pts):
            self.pts = pts

    vs = {}
    for name in g.nodes:
        v = Vertex(name)
        v.view = _View(sizes[name][1], sizes[name][0])
        vs[name] = v
    es = []
    for i, e in enumerate(g.edges):
        ge = Edge(vs[e.src], vs[e.dst], data=i)
        ge.view = _EView()
        es.append(ge)
    graph = Graph(list(vs.values()), es)
    rank, pos, dummy = {}, {}, {}
    offset = 0.0
    for comp in graph.C:
        sug = SugiyamaLayout(comp)
        sug.xspace, sug.yspace = SEP, GAP
        sug.dw, sug.dh = DUMMY, DUMMY
        sug.init_all(optimize=True)
        sug.draw(3)
        lo = min(v.view.xy[0] - v.view.w / 2 for layer in sug.layers for v in layer)
        hi = max(v.view.xy[0] + v.view.w / 2 for layer in sug.layers for v in layer)
        for layer in sug.layers:
            for v in layer:
                if getattr(v, "data", None) in vs and vs[v.data] is v:
                    rank[v.data] = sug.grx[v].rank
                    pos[v.data] = v.view.xy[0] - lo + offset
        for ge in comp.E():
            for r, d in (sug.ctrls.get(ge) or {}).items():
                if r not in (rank[ge.v[0].data], rank[ge.v[1].data]):
                    dummy[(ge.data, r)] = d.view.xy[0] - lo + offset
        offset += hi - lo + SEP * 2
    return rank, pos, dummy


def layout(g: VizGraph) -> Layout:
    texts = {n: box_text(v) for n, v in g.nodes.items()}
    sizes = {n: _size_box(g.nodes[n], texts[n]) for n in g.nodes}
    rank, pos, dummy = _grandalf_order(g, sizes)
    nranks = max(rank.values(), default=-1) + 1
    # 1. columns: enforce vertical separation of boxes and dummies inside each rank, keeping grandalf's order
    items: dict[int, list] = {r: [] for r in range(nranks)}
    for n, r in rank.items():
        items[r].append((pos[n], sizes[n][1], ("node", n)))
    for (ei, r), y in dummy.items():
        items[r].append((y, DUMMY, ("dummy", ei, r)))
    top: dict[tuple, float] = {}
    for r, its in items.items():
        cursor = -1e18
        for center, ext, key in sorted(its, key=lambda t: t[0]):
            t = max(center - ext / 2, cursor + SEP)
            top[key] = t
            cursor = t + ext
    shift = MARGIN + 50 - min(top.values(), default=0.0)          # room for the title and a frame caption
    top = {k: v + shift for k, v in top.items()}
    # 2. x positions: lane (labels of edges entering this rank) then band (the boxes)
    lane_w = [12.0] * nranks
    for e in g.edges:
        lane_w[rank[e.dst]] = max(lane_w[rank[e.dst]], text_width(e.type, LABEL_FONT) + 16)
    band_w = [0.0] * nranks
    for n, r in rank.items():
        band_w[r] = max(band_w[r], sizes[n][0])
    lane_x, band_x, x = [], [], MARGIN
    for r in range(nranks):
        lane_x.append(x)
        band_x.append(x + lane_w[r])
        x += lane_w[r] + band_w[r] + GAP
    boxes = {n: Rect(band_x[r], top[("node", n)], *sizes[n]) for n, r in rank.items()}
    ports = {}
    for n, b in boxes.items():
        v = g.nodes[n]
        for i, p in enumerate(v.in_ports):
            ports[(n, "in", p)] = (b.x, _port_y(v, texts[n], b.y, i))
        for i, p in enumerate(v.out_ports):
            ports[(n, "out", p)] = (b.right, _port_y(v, texts[n], b.y, i))
    # 3. edges
    routed = []
    for ei, e in enumerate(g.edges):
        ru, rv = rank[e.src], rank[e.dst]
        x0, y0 = ports[(e.src, "out", e.src_port)]
        x1, y1 = ports[(e.dst, "in", e.dst_port)]
        pts, curved = [(x0, y0), (band_x[ru] + band_w[ru], y0)], set()
        for r in range(ru + 1, rv):
            yd = top[("dummy", ei, r)] + DUMMY / 2
            curved.add(len(pts) - 1)
            pts += [(lane_x[r], yd), (band_x[r] + band_w[r], yd)]
        curved.add(len(pts) - 1)
        pts += [(lane_x[rv], y1), (x1, y1)]
        tw = text_width(e.type, LABEL_FONT)
        label_rect = Rect(x1 - 6 - tw, y1 - 3 - LABEL_FONT, tw, LABEL_FONT + 1)
        routed.append(RoutedEdge(e, pts, curved, e.type, label_rect))
    width = max((b.right for b in boxes.values()), default=0) + MARGIN
    height = max((b.bottom for b in boxes.values()), default=0) + MARGIN
    out = Layout(boxes, texts, ports, routed, [], width, height)
    out.frames = _frames(g, out)
    return out


def _frames(g: VizGraph, lay: Layout) -> list[Frame]:
    """One frame per group when its bounding box holds no other box or label; else one per member."""
    frames = []
    for title, members in g.groups().items():
        members = [m for m in members if m in lay.boxes]
        if not members:
            continue
        rs = [lay.boxes[m] for m in members]
        x0, y0 = min(r.x for r in rs), min(r.y for r in rs)
        bbox = Rect(x0, y0, max(r.right for r in rs) - x0, max(r.bottom for r in rs) - y0).grow(7)
        others = [b for n, b in lay.boxes.items() if n not in members] + [
            re.label_rect for re in lay.edges if re.edge.dst not in members]
        if not any(bbox.intersects(o) for o in others):
            frames.append(Frame(title, bbox, members))
        else:
            frames += [Frame(title, lay.boxes[m].grow(7), [m]) for m in members]
    return frames
