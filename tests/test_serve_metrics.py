"""/metrics is Prometheus text that prometheus_client's own parser reads, with a series per live session (fps,
block ms, frames, drops) that agrees with what the client received, the queue depth, and GPU memory families;
/metrics.json (or Accept: application/json) keeps the JSON snapshot."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from flashdreams_cli.serve.client import Client
from test_serve import run, serving, toy_spec

parser = pytest.importorskip("prometheus_client.parser")


def scrape(text: str) -> dict[str, list]:
    """family name (counters without _total) -> samples"""
    return {f.name: f.samples for f in parser.text_string_to_metric_families(text)}


def test_prometheus_metrics_parse_and_follow_the_sessions(tmp_path):
    spec = toy_spec(tmp_path, blocks=200, delay_ms=40)

    async def go():
        async with serving(spec, max_queue=2, token="t0k", max_batch=1) as (server, url):   # b must wait
            auth = {"Authorization": "Bearer t0k"}
            async with Client.connect(url, token="t0k") as a, Client.connect(url, token="t0k") as b, \
                    aiohttp.ClientSession() as http:
                await a.start(prompt="hello")
                started = await a.wait_for("started")
                await b.start(prompt="waiting")                  # one replica: b waits in the queue
                assert (await b.wait_for("queue"))["position"] == 1
                t0 = time.monotonic()
                arrivals = []
                while time.monotonic() - t0 < 3.0:
                    item = await a.recv()
                    if not isinstance(item, dict):
                        arrivals.append(time.monotonic())
                got = len(arrivals)
                recent = sum(1 for t in arrivals if time.monotonic() - t <= 2.0) / 2.0    # frames/s received
                async with http.get(url + "/metrics") as r:
                    assert r.status == 401                       # the token guards metrics too
                async with http.get(url + "/metrics", headers=auth) as r:
                    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                    m = scrape(await r.text())
                async with http.get(url + "/metrics", headers={**auth, "Accept": "application/json"}) as r:
                    snap = await r.json()
                async with http.get(url + "/metrics.json", headers=auth) as r:
                    assert (await r.json())["spec"] == "toy_stream"
                await b.stop()
                await a.stop()
                await a.wait_for("stopped")
                await asyncio.sleep(0.1)
                async with http.get(url + "/metrics", headers=auth) as r:
                    after = scrape(await r.text())
                return started, got, recent, m, snap, after

    started, got, recent, m, snap, after = run(go(), timeout=40)
    sid = str(started["session"])
    (fps,) = m["fd_serve_session_fps"]
    assert fps.labels["session"] == sid and fps.labels["replica"] == "0" and fps.labels["spec"] == "toy_stream"
    assert fps.labels["pace"] == "realtime"
    # paced at the spec's 8 fps (2 frames a block, a 40 ms block): the metric and what the client received agree
    assert abs(fps.value - 8) <= 0.8 and abs(recent - 8) <= 2, (fps.value, recent)
    (sent,) = m["fd_serve_session_frames"]
    assert sent.value >= got > 0                              # everything the client got was counted
    (block_ms,) = m["fd_serve_session_block_ms"]
    assert block_ms.value >= 40                               # the node sleeps 40 ms per block
    assert m["fd_serve_session_frames_dropped"][0].value == 0
    assert m["fd_serve_queue_depth"][0].value == 1 == snap["queue_length"]
    assert m["fd_serve_sessions_active"][0].value == 1 and m["fd_serve_connections"][0].value == 2
    assert m["fd_serve_blocks"][0].value >= 1 and m["fd_serve_ready"][0].value == 1
    assert {s.labels["stat"] for s in m["fd_serve_block_ms"]} == {"last", "median", "p90", "max"}
    assert "fd_serve_gpu_memory_allocated_bytes" in m and "fd_serve_gpu_memory_reserved_bytes" in m
    (rep,) = m["fd_serve_replica_sessions"]
    assert rep.labels["replica"] == "0" and rep.value == 1 and m["fd_serve_replica_free_slots"][0].value == 0
    assert m["fd_serve_replica_batches"][0].value >= 1 and m["fd_serve_max_batch"][0].value == 1
    assert {s.labels["status"] for s in m["fd_serve_video_jobs"]} == {"queued", "in_progress", "completed", "failed"}
    # the session's series go with the session
    assert after["fd_serve_session_fps"] == [] and after["fd_serve_queue_depth"][0].value == 0
