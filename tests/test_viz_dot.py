"""When Graphviz is installed, `fd viz -o x.svg` uses its layout: check that layout's geometry too.

Reads ``dot -Tjson`` (node boxes, edge B-splines, edge-label positions) for every packaged spec
and the synthetic graphs of test_viz_layout, and checks that no edge passes through a box it
does not connect, that no two boxes overlap and that no edge label sits on a box.
"""
from __future__ import annotations

import pytest

import engine
from engine.viz import dot
from engine.viz.layout import Rect
from engine.viz.model import build

from test_viz_layout import SPECS, SYNTHETIC, _bezier, _seg_hits_rect

pytestmark = pytest.mark.skipif(not dot.available(), reason="Graphviz `dot` is not installed")


def _boxes(j) -> dict[str, Rect]:
    out = {}
    for o in j["objects"]:
        if "pos" in o and "width" in o:
            x, y = map(float, o["pos"].split(","))
            w, h = float(o["width"]) * 72, float(o["height"]) * 72
            out[o["name"]] = Rect(x - w / 2, y - h / 2, w, h)
    return out


def _spline_segments(edge):
    segs = []
    for op in edge.get("_draw_", []):
        if op.get("op") not in ("b", "B"):
            continue
        pts = [tuple(p) for p in op["points"]]
        for i in range(0, len(pts) - 3, 3):
            samples = [_bezier(pts[i:i + 4], k / 24) for k in range(25)]
            segs += list(zip(samples, samples[1:]))
    return segs


def dot_problems(j) -> list[str]:
    boxes = _boxes(j)
    names = {o["_gvid"]: o["name"] for o in j["objects"]}
    bad = []
    keys = list(boxes)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if boxes[a].intersects(boxes[b], eps=0.5):
                bad.append(f"boxes {a} and {b} overlap")
    for e in j.get("edges", []):
        src, dst = names[e["tail"]], names[e["head"]]
        for p, q in _spline_segments(e):
            for n, r in boxes.items():
                if n not in (src, dst) and _seg_hits_rect(p, q, r, eps=1.0):
                    bad.append(f"edge {src}->{dst} passes through box {n}")
        for op in e.get("_ldraw_", []):
            if op.get("op") == "T":
                x, y = op["pt"]
                for n, r in boxes.items():
                    if r.grow(-1).intersects(Rect(x - 0.5, y - 0.5, 1, 1)):
                        bad.append(f"label of {src}->{dst} sits on box {n}")
    return sorted(set(bad))


@pytest.mark.parametrize("spec", SPECS)
def test_graphviz_layout_of_packaged_specs_is_clean(spec):
    assert dot_problems(dot.dot_json(build(engine.load_plan(spec, check_devices=False)))) == []


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_graphviz_layout_of_synthetic_graphs_is_clean(name):
    assert dot_problems(dot.dot_json(SYNTHETIC[name])) == []


def test_dot_checker_catches_a_box_on_an_edge():
    j = dot.dot_json(SYNTHETIC["branches"])
    edge = next(e for e in j["edges"] if e.get("_draw_"))
    (p, _q) = _spline_segments(edge)[len(_spline_segments(edge)) // 2]
    victim = next(o for o in j["objects"] if o["_gvid"] not in (edge["tail"], edge["head"]) and "pos" in o)
    victim["pos"] = f"{p[0]},{p[1]}"
    assert any(f"through box {victim['name']}" in x for x in dot_problems(j))
