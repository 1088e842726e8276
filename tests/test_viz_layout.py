"""Geometry of `fd viz` drawings, checked on the computed layout rather than by eye.

For every packaged spec and three synthetic graphs with branches, fan-in, fan-out and edges that
skip layers: no edge segment enters a box, no two boxes overlap, no edge label is covered by a
box or crossed by another edge, every graph input is drawn, and every box is wide enough for its
text. A hand-broken layout must be caught, so the checker itself is tested.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import engine
from engine.viz import layout as L
from engine.viz.model import VEdge, VizGraph, VNode, build

SPECS = sorted(p.stem for p in (Path(__file__).parent.parent / "specs").glob("*.yaml"))


def _seg_hits_rect(p, q, r: L.Rect, eps=0.5) -> bool:
    """Does segment p-q pass through the interior of r (shrunk by eps)? Liang-Barsky clipping."""
    x0, y0, x1, y1 = r.x + eps, r.y + eps, r.right - eps, r.bottom - eps
    if x0 >= x1 or y0 >= y1:
        return False
    dx, dy = q[0] - p[0], q[1] - p[1]
    t0, t1 = 0.0, 1.0
    for pk, qk in ((-dx, p[0] - x0), (dx, x1 - p[0]), (-dy, p[1] - y0), (dy, y1 - p[1])):
        if pk == 0:
            if qk < 0:
                return False
            continue
        t = qk / pk
        if pk < 0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
        if t0 > t1:
            return False
    return True


def drawn_segments(re_):
    """The segments as drawn: gap crossings are cubic S-curves, sampled finely."""
    segs = []
    for i in range(len(re_.points) - 1):
        (x0, y0), (x1, y1) = re_.points[i], re_.points[i + 1]
        if i in re_.curved and y0 != y1:
            mx = (x0 + x1) / 2
            ctrl = [(x0, y0), (mx, y0), (mx, y1), (x1, y1)]
            pts = [_bezier(ctrl, k / 32) for k in range(33)]
            segs += list(zip(pts, pts[1:]))
        else:
            segs.append(((x0, y0), (x1, y1)))
    return segs


def _bezier(c, t):
    u = 1 - t
    return tuple(u ** 3 * c[0][i] + 3 * u * u * t * c[1][i] + 3 * u * t * t * c[2][i] + t ** 3 * c[3][i] for i in (0, 1))


def layout_problems(g: VizGraph, lay: L.Layout) -> list[str]:
    bad = []
    names = list(lay.boxes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if lay.boxes[a].intersects(lay.boxes[b]):
                bad.append(f"boxes {a} and {b} overlap")
    for k, re_ in enumerate(lay.edges):
        e = re_.edge
        if re_.points[0] != lay.ports[(e.src, "out", e.src_port)] or re_.points[-1] != lay.ports[(e.dst, "in", e.dst_port)]:
            bad.append(f"edge {e.src}->{e.dst} does not start and end at its ports")
        for p, q in drawn_segments(re_):
            for n, r in lay.boxes.items():
                if _seg_hits_rect(p, q, r):
                    bad.append(f"edge {e.src}.{e.src_port}->{e.dst}.{e.dst_port} passes through box {n}")
        for n, r in lay.boxes.items():
            if re_.label_rect.intersects(r):
                bad.append(f"label {re_.label!r} of {e.src}->{e.dst} is under box {n}")
        for j, other in enumerate(lay.edges):
            if j == k:
                continue
            if re_.label_rect.intersects(other.label_rect):
                bad.append(f"labels of edges {k} and {j} overlap")
            if other.edge.dst == e.dst and other.edge.dst_port == e.dst_port:
                continue
            if any(_seg_hits_rect(p, q, re_.label_rect, eps=0) for p, q in drawn_segments(other)):
                bad.append(f"edge {other.edge.src}->{other.edge.dst} crosses the label of {e.src}->{e.dst}")
    for n, bt in lay.texts.items():
        need = max(L.text_width(t, L._SIZES[s]) for t, s in bt.lines) + 2 * L.PAD
        if need > lay.boxes[n].w + 1e-6:
            bad.append(f"text of {n} is wider than its box")
    return sorted(set(bad))


@pytest.mark.parametrize("spec", SPECS)
def test_packaged_spec_layout_is_clean(spec):
    plan = engine.load_plan(spec, check_devices=False)
    g = build(plan)
    lay = L.layout(g)
    assert layout_problems(g, lay) == []
    wired_inputs = {f"inputs.{r.port}" for np_ in plan.nodes.values() for r in np_.wires.values() if r.node == "inputs"}
    assert wired_inputs <= set(lay.boxes)
    assert set(plan.nodes) <= set(lay.boxes)


def _node(name, ins=(), outs=("out",), phase="block"):
    return VNode(name=name, kind="node", type_name="t." + name, phase=phase, device="cpu",
                 in_ports=list(ins), out_ports=list(outs))


def _graph(nodes, edges):
    return VizGraph("synthetic", "", "x.yaml", {n.name: n for n in nodes},
                    [VEdge(s, sp, d, dp, "tensor") for s, sp, d, dp in edges])


SYNTHETIC = {
    # a diamond whose long edge skips two layers, next to the short paths
    "branches": _graph([_node("a", outs=("x", "y")), _node("b", ("i",)), _node("c", ("i",)),
                        _node("d", ("i",)), _node("e", ("p", "q", "r"))],
                       [("a", "x", "b", "i"), ("b", "out", "c", "i"), ("c", "out", "e", "p"),
                        ("a", "y", "d", "i"), ("d", "out", "e", "q"), ("a", "x", "e", "r")]),
    # six sources into one node
    "fan_in": _graph([_node(f"s{i}") for i in range(6)] + [_node("sink", [f"p{i}" for i in range(6)], ())],
                     [(f"s{i}", "out", "sink", f"p{i}") for i in range(6)]),
    # one output to many consumers at different depths, some chained
    "fan_out": _graph([_node("src", outs=("v",))] + [_node(f"c{i}", ("i", "j")) for i in range(5)],
                      [("src", "v", f"c{i}", "i") for i in range(5)]
                      + [(f"c{i}", "out", f"c{i + 1}", "j") for i in range(0, 4, 2)]),
}


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_synthetic_graph_layout_is_clean(name):
    g = SYNTHETIC[name]
    lay = L.layout(g)
    assert layout_problems(g, lay) == []
    assert len(lay.edges) == len(g.edges)


def test_checker_catches_an_edge_through_a_box_and_overlapping_boxes():
    g = SYNTHETIC["branches"]
    lay = L.layout(g)
    long_edge = next(re_ for re_ in lay.edges if re_.edge.src == "a" and re_.edge.dst == "e")
    mid = long_edge.points[len(long_edge.points) // 2]
    lay.boxes["c"] = L.Rect(mid[0] - 20, mid[1] - 20, 40, 40)          # drop a box onto the long edge
    problems = layout_problems(g, lay)
    assert any("passes through box c" in p for p in problems), problems
    lay.boxes["d"] = L.Rect(lay.boxes["b"].x, lay.boxes["b"].y, 10, 10)
    assert any("overlap" in p for p in layout_problems(g, lay))


def test_wide_characters_are_measured_as_two_columns():
    assert L.columns("镜头") == 4 and L.text_width("镜头") == L.text_width("abcd")
    assert L.columns(L.clip("镜头晃动，色调艳丽" * 4, 30)) <= 30
