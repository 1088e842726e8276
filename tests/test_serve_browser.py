"""The fd serve page in headless Chromium: start, frames drawn on the canvas, prompt switch, stop, screenshot."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

# CI (.ci/run) sets FD_REQUIRE_BROWSER=1: there a missing browser or Playwright fails instead of skipping
REQUIRED = os.environ.get("FD_REQUIRE_BROWSER") == "1"


def _absent(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason}, and FD_REQUIRE_BROWSER=1 requires the browser test", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


if not os.path.exists(CHROMIUM):
    _absent(f"{CHROMIUM} is absent (apt-get install -y chromium)")
try:
    from playwright import sync_api
except ImportError:
    _absent("playwright is not installed (pip install playwright)")

from flashdreams_cli.serve import BackgroundServer, ServeConfig  # noqa: E402
from test_serve import registry, rings_spec  # noqa: E402


CANVAS_SUM = """() => { const c = document.getElementById('video');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let s = 0; for (let i = 0; i < d.length; i += 97) s += d[i]; return s; }"""


def test_page_streams_switches_prompt_and_stops(tmp_path):
    with BackgroundServer(rings_spec(tmp_path), ServeConfig(port=0), registry=registry()) as bg, \
            sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 860})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(bg.url + "/")
            page.wait_for_function("window.fdDebug.phase === 'ready'", timeout=10_000)
            assert page.inner_text("#spec-name") == "rings_demo"
            assert page.is_hidden("#camera-help")        # the spec has no camera/action input
            page.fill("#prompt", "a red fox")
            page.fill("#seed", "7")
            page.click("#start")
            page.wait_for_function("window.fdDebug.framesDrawn >= 3", timeout=10_000)
            first = page.evaluate(CANVAS_SUM)
            page.wait_for_function("window.fdDebug.framesDrawn >= 12", timeout=10_000)
            assert page.evaluate(CANVAS_SUM) != first          # the picture moves
            session = page.evaluate("window.fdDebug.session")
            page.fill("#prompt", "a snowy forest at dusk")
            page.click("#switch")
            page.wait_for_function("document.getElementById('message').textContent.includes('prompt switched')",
                                   timeout=10_000)
            drawn = page.evaluate("window.fdDebug.framesDrawn")
            page.wait_for_function(f"window.fdDebug.framesDrawn >= {drawn + 8}", timeout=10_000)
            assert page.evaluate("window.fdDebug.session") == session   # same session, no restart
            assert float(page.inner_text("#fps")) > 0
            shot = tmp_path / "serve_screenshot.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            with_out = Path("out")
            try:
                with_out.mkdir(exist_ok=True)
                shutil.copy(shot, with_out / "serve_screenshot.png")
            except OSError:
                pass
            page.click("#stop")
            page.wait_for_function("window.fdDebug.phase === 'stopped'", timeout=10_000)
            assert not bg.server.manager.active
            assert errors == []
        finally:
            browser.close()
    assert not (tmp_path / "never.mp4").exists()
    assert math.isfinite(first)
