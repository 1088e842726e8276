"""The `fd viz -o x.html` page in headless Chromium, with every network request refused.

Opens the wan21_i2v_14b view, waits for the shipped elkjs to re-lay it, clicks the sampler box
and expects its params, docstring and spec location in the side panel; hovers a wire and
expects its type; zooms with the wheel. Saves a screenshot (tmp_path, and
out/viz_wan21_i2v_14b.png when writable) as an artefact. Then checks ELK's layout of every
packaged spec and the synthetic graphs with the same geometry checks as the Python layout.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import engine
from engine.viz.html import to_html
from engine.viz.layout import Rect
from engine.viz.model import build
from flashdreams_cli.main import main
from test_viz_layout import SPECS, SYNTHETIC, _seg_hits_rect

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

# a point half way along a wire, in page pixels (a path's box centre is usually off the stroke)
EDGE_POINT = """(sel) => { const p = document.querySelector(sel); const q = p.getPointAtLength(p.getTotalLength() / 2);
  const m = p.getScreenCTM(); return [q.x * m.a + q.y * m.c + m.e, q.x * m.b + q.y * m.d + m.f]; }"""


def test_html_view_offline_click_shows_params(tmp_path):
    page_file = tmp_path / "wan.html"
    assert main(["viz", "wan21_i2v_14b", "-o", str(page_file)]) == 0
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 800})
            requests, errors = [], []
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:")
                       else (requests.append(route.request.url), route.abort()))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_file.as_uri())
            page.wait_for_function("document.body.dataset.layout", timeout=30_000)
            assert page.evaluate("document.body.dataset.layout") == "elk"
            page.click('g.node[data-node="sampler"]')
            params = page.inner_text("#side-params")
            assert '"num_steps": 40' in params and '"solver": "unipc"' in params
            assert "wan21_i2v_14b.yaml:" in page.inner_text("#side-where")
            assert page.inner_text("#side-doc")
            x, y = page.evaluate(EDGE_POINT, 'g.edge[data-dst="sampler"][data-src="text"] path')
            page.mouse.move(x, y)
            assert "text_embedding" in page.inner_text("#hover")
            before = page.get_attribute("svg", "viewBox")
            page.mouse.move(500, 400)
            page.mouse.wheel(0, -300)
            page.wait_for_function(f"document.querySelector('svg').getAttribute('viewBox') !== '{before}'")
            shot = tmp_path / "viz_wan21_i2v_14b.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            try:
                Path("out").mkdir(exist_ok=True)
                shutil.copy(shot, Path("out") / shot.name)
            except OSError:
                pass
            assert errors == [] and requests == []
        finally:
            browser.close()


def elk_problems(geo) -> list[str]:
    boxes = {k: Rect(v["x"], v["y"], v["w"], v["h"]) for k, v in geo["boxes"].items()}
    bad = []
    names = list(boxes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if boxes[a].intersects(boxes[b]):
                bad.append(f"boxes {a} and {b} overlap")
    for e in geo["edges"]:
        for p, q in zip(e["points"], e["points"][1:]):
            bad += [f"wire {e['edge']} passes through box {n}" for n, r in boxes.items() if _seg_hits_rect(p, q, r)]
    for lab in geo["labels"]:
        r = Rect(lab["x"], lab["y"], lab["w"], lab["h"])
        bad += [f"label of wire {lab['edge']} is under box {n}" for n, b in boxes.items() if r.intersects(b)]
    return bad


def test_elk_layout_of_every_spec_and_synthetic_graph_is_clean(tmp_path):
    graphs = {s: build(engine.load_plan(s, check_devices=False)) for s in SPECS} | dict(SYNTHETIC)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:")
                       else route.abort())
            for name, g in graphs.items():
                f = tmp_path / f"{name}.html"
                f.write_text(to_html(g), encoding="utf-8")
                page.goto(f.as_uri())
                page.wait_for_function("document.body.dataset.layout", timeout=30_000)
                assert page.evaluate("document.body.dataset.layout") == "elk", name
                geo = page.evaluate("window.fdLayout")
                assert set(geo["boxes"]) == set(g.nodes) and len(geo["edges"]) == len(g.edges), name
                assert len(geo["labels"]) == len(g.edges), name
                assert elk_problems(geo) == [], name
        finally:
            browser.close()


def test_elk_checker_catches_a_wire_through_a_box():
    geo = {"boxes": {"a": {"x": 0, "y": 0, "w": 10, "h": 10}, "b": {"x": 50, "y": 0, "w": 10, "h": 10},
                     "c": {"x": 25, "y": 0, "w": 10, "h": 10}},
           "edges": [{"edge": 0, "points": [[10, 5], [50, 5]]}], "labels": []}
    assert elk_problems(geo) == ["wire 0 passes through box c"]
