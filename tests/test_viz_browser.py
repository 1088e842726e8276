"""The `fd viz -o x.html` page in headless Chromium, with every network request refused.

Opens the wan21_i2v_14b view, clicks the sampler box and expects its params, docstring and
spec location in the side panel; hovers a wire and expects its type; zooms with the wheel.
Saves a screenshot (tmp_path, and out/viz_wan21_i2v_14b.png when writable) as an artefact.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from flashdreams_cli.main import main

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
