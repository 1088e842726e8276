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


HOSTILE_PAGE = """<!doctype html><title>evil</title><script>
window.result = 'pending';
const ws = new WebSocket('ws://127.0.0.1:%d/ws');
ws.onopen = () => { window.result = 'opened'; };
ws.onerror = () => { if (window.result === 'pending') window.result = 'refused'; };
ws.onclose = () => { if (window.result === 'pending') window.result = 'refused'; };
</script>"""


def test_page_from_another_origin_cannot_open_the_websocket(tmp_path):
    """Cross-site WebSocket hijacking: a page on another origin tries /ws and is refused (403 at the upgrade);
    the server's own page still reaches 'ready'."""
    import http.server
    import threading

    with BackgroundServer(rings_spec(tmp_path), ServeConfig(port=0), registry=registry()) as bg, \
            sync_api.sync_playwright() as pw:
        (tmp_path / "evil.html").write_text(HOSTILE_PAGE % bg.server.port)
        handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
        evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=evil.serve_forever, daemon=True).start()
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{evil.server_address[1]}/evil.html")
            page.wait_for_function("window.result !== 'pending'", timeout=10_000)
            assert page.evaluate("window.result") == "refused"
            assert not bg.server.connections
            own = browser.new_page()
            own.goto(bg.url + "/")
            own.wait_for_function("window.fdDebug.phase === 'ready'", timeout=10_000)
        finally:
            browser.close()
            evil.shutdown()


def test_page_counts_drops_as_the_server_does(tmp_path):
    """The overlay's "dropped" and /metrics count the same thing: frames the server generated for the session
    that never reached the page. The page's tab is frozen for a while (a busy loop) so its socket fills and the
    server's outbox drops frames; afterwards both counts must agree, and be > 0."""
    blocks = 40
    spec = rings_spec(tmp_path, blocks=blocks, delay_ms=0, size=(640, 360), grain=0.5)
    with BackgroundServer(spec, ServeConfig(port=0, pace="asap", quality=100), registry=registry()) as bg, \
            sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(bg.url + "/")
            page.wait_for_function("window.fdDebug.phase === 'ready'", timeout=10_000)
            page.click("#start")
            page.wait_for_function("window.fdDebug.framesReceived >= 1", timeout=20_000)
            for _ in range(20):                     # freeze the tab until the server has dropped frames
                page.evaluate("() => { const t = Date.now(); while (Date.now() - t < 1000); }")
                if bg.server.metrics.frames_dropped > 0:
                    break
            page.wait_for_function(f"window.fdDebug.nextIndex >= {blocks * 4}", timeout=60_000)  # the last frame
            rollout = bg.server.manager.rollouts()[0]
            server_dropped = rollout.stats()["frames_dropped"]
            page_dropped = page.evaluate("window.fdDebug.dropped")
            overlay = int(page.inner_text("#dropped"))
            snap = bg.server.metrics_snapshot()
        finally:
            browser.close()
    assert server_dropped > 0, "the frozen tab should have made the server drop frames"
    assert page_dropped == overlay == server_dropped == snap["frames_dropped"], \
        (page_dropped, overlay, server_dropped, snap["frames_dropped"])
