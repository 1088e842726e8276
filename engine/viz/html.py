"""The interactive HTML view: one file, no network.

It embeds the same SVG the tests check (so the picture in the browser is the tested one),
the node and edge details as JSON, and a small script and stylesheet shipped in
``engine/viz/assets`` for zoom/pan, click-for-params and edge hover.
"""
from __future__ import annotations

import html
import json
from importlib import resources

from .layout import box_text
from .model import VizGraph
from .svg import render


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


def to_html(g: VizGraph) -> str:
    e = html.escape
    data = json.dumps(page_data(g), ensure_ascii=False).replace("</", "<\\/")
    return ("<!doctype html>\n<html><head><meta charset='utf-8'>"
            f"<title>{e(g.name)} — fd viz</title><style>{_asset('viz.css')}</style></head><body>"
            f"<div id='graph'>{render(g)}</div>"
            f"<div id='side'><h2>{e(g.name)}</h2><p>{e(g.description)}</p>"
            "<p class='help'>Click a node for its params, docstring and place in the spec. Hover a wire for its "
            "type and shape. Wheel zooms, drag pans.</p></div><div id='hover'></div>"
            f"<script type='application/json' id='fd-data'>{data}</script>"
            f"<script>{_asset('viz.js')}</script></body></html>\n")
