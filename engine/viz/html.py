"""The interactive HTML view: one file, no network.

It embeds the SVG of the Python layout, the node and edge details as JSON, and scripts shipped
in ``engine/viz/assets``: ours for zoom/pan, click-for-params and wire hover, and elkjs (ELK's
layered algorithm, EPL-2.0, vendored so the page works offline). When ``elk=True`` the page
re-lays the graph with ELK in the browser, with each port fixed where the box draws it, and
moves the drawn boxes and wires there; without ELK (or if it fails) the Python layout stays.
``tests/test_viz_browser.py`` checks ELK's geometry with the same checker as the Python layout.
"""
from __future__ import annotations

import html
import json
from importlib import resources

from .layout import LABEL_FONT, Layout, box_text, layout, text_width
from .model import VizGraph
from .svg import render

ELK_OPTIONS = {
    "elk.algorithm": "layered", "elk.direction": "RIGHT", "elk.edgeRouting": "ORTHOGONAL",
    "elk.layered.spacing.nodeNodeBetweenLayers": "60", "elk.spacing.nodeNode": "40",
    "elk.spacing.edgeNode": "20", "elk.spacing.edgeEdge": "12", "elk.spacing.edgeLabel": "4",
    "elk.layered.spacing.edgeNodeBetweenLayers": "20", "elk.padding": "[top=70,left=24,bottom=12,right=24]",
}


def elk_graph(g: VizGraph, lay: Layout) -> dict:
    """The ELK JSON graph: our box sizes, ports at the positions our boxes draw them (FIXED_POS)."""
    children = []
    for name, b in lay.boxes.items():
        ports = [{"id": f"{name}|{side}|{p}", "x": px - b.x, "y": py - b.y, "width": 0, "height": 0,
                  "layoutOptions": {"elk.port.side": "WEST" if side == "in" else "EAST"}}
                 for (n, side, p), (px, py) in lay.ports.items() if n == name]
        children.append({"id": name, "width": b.w, "height": b.h, "ports": ports,
                         "layoutOptions": {"elk.portConstraints": "FIXED_POS"}})
    edges = [{"id": f"e{i}", "sources": [f"{e.src}|out|{e.src_port}"], "targets": [f"{e.dst}|in|{e.dst_port}"],
              "labels": [{"text": e.type, "width": text_width(e.type, LABEL_FONT) + 4, "height": LABEL_FONT + 3}]}
             for i, e in enumerate(g.edges)]
    return {"id": "root", "layoutOptions": ELK_OPTIONS, "children": children, "edges": edges}


def _asset(name: str) -> str:
    return resources.files("engine.viz").joinpath("assets", name).read_text(encoding="utf-8")


def page_data(g: VizGraph) -> dict:
    nodes = {}
    for n in g.nodes.values():
        facts = [t for t, _ in box_text(n).lines[1:]]
        if n.kind == "node":
            facts += [f"placement: {n.device_reason}", f"capture: {n.capture_reason}"]
        nodes[n.name] = {"type_name": n.type_name, "doc": n.doc, "where": n.where, "params": n.params,
                         "facts": facts, "p50_ms": n.p50(), "p99_ms": n.p99()}
    edges = [{"src": e.src, "src_port": e.src_port, "dst": e.dst, "dst_port": e.dst_port, "type": e.type,
              "doc": e.doc} for e in g.edges]
    return {"name": g.name, "nodes": nodes, "edges": edges}


def to_html(g: VizGraph, elk: bool = True) -> str:
    e = html.escape
    lay = layout(g)
    payload = page_data(g)
    payload["boxes"] = {n: {"x": b.x, "y": b.y} for n, b in lay.boxes.items()}
    payload["elk"] = elk_graph(g, lay) if elk else None
    data = json.dumps(payload, ensure_ascii=False).replace("</", "<\\/")
    elk_js = f"<script>{_asset('elk.bundled.js')}</script><script>{_asset('elk-layout.js')}</script>" if elk else ""
    return ("<!doctype html>\n<html><head><meta charset='utf-8'>"
            f"<title>{e(g.name)} — fd viz</title><style>{_asset('viz.css')}</style></head><body>"
            f"<div id='graph'>{render(g, lay)}</div>"
            f"<div id='side'><h2>{e(g.name)}</h2><p>{e(g.description)}</p>"
            "<p class='help'>Click a node for its params, docstring and place in the spec. Hover a wire for its "
            "type and shape. Wheel zooms, drag pans.</p></div><div id='hover'></div>"
            f"<script type='application/json' id='fd-data'>{data}</script>"
            f"<script>{_asset('viz.js')}</script>{elk_js}</body></html>\n")
