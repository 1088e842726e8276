"""Loopback soak of fd serve (bounded: 50 clients, well under 60 s): clients that stream and switch prompts
(paced in real time or as fast as possible), send garbage, flood messages, or drop mid-stream, all at once,
on two replicas that batch up to 8 sessions each. The server stays up, RSS growth stays under
RSS_BOUND_MIB after a warm-up round, every frame a client sees belongs to one of its own sessions, and every replica comes back."""
from __future__ import annotations

import asyncio
import collections
import json
import time

import aiohttp

from flashdreams_cli.serve.client import Client
from test_serve import run, serving, toy_spec
from test_serve_load import rss_mib

CLIENTS = 50
ROUNDS = 4
RSS_BOUND_MIB = 150
GARBAGE = [b"\x00\xff" * 50, "not json", '{"type": "warp"}', '{"type": "start", "seed": -5}',
           '{"type": "start", "seed": 99999999999999999999999}', '{"type": "start", "blocks": -1}',
           '{"type": "start", "quality": 1000}', json.dumps({"type": "prompt", "prompt": "y" * 30000}),
           '[1, 2, 3]', '{"type": null}']


async def streamer(url, i):
    """Start, switch the prompt once, read to the end: frames must carry only this client's session ids, in
    order, with every gap in the frame index counted by the server as a drop of this session."""
    async with Client.connect(url) as c:
        await c.start(prompt=f"client {i}", pace="asap" if i % 2 else "realtime")
        mine, frames, switched = set(), [], False
        while True:
            item = await c.recv(timeout=40)
            if isinstance(item, dict):
                if item["type"] == "started":
                    mine.add(item["session"])
                elif item["type"] == "done":
                    break
                elif item["type"] == "error":
                    raise AssertionError(f"streamer {i}: {item['message']}")
            else:
                frames.append(item)
                if not switched:
                    await c.prompt(f"client {i}, switched")
                    switched = True
        idx = [f.header.index for f in frames]
        return {"kind": "stream", "mine": mine, "sessions": {f.header.session for f in frames}, "n": len(frames),
                "ordered": idx == sorted(set(idx)), "gaps": idx[-1] + 1 - len(idx) if idx else 0}


async def garbler(url, i):
    """Every malformed message gets an error back, and the connection still answers a ping."""
    async with Client.connect(url) as c:
        errors = 0
        for g in GARBAGE:
            await (c.ws.send_bytes(g) if isinstance(g, bytes) else c.ws.send_str(g))
            await c.wait_for("error", timeout=20)
            errors += 1
        pong = await c.ping()
        return {"kind": "garbage", "errors": errors, "pong": pong["type"]}


async def flooder(url, i):
    """300 pings at once: the excess is dropped with a rate-limit error; the connection survives."""
    async with Client.connect(url) as c:
        for _ in range(300):
            await c.ws.send_str('{"type": "ping"}')
        err = await c.wait_for("error", timeout=20)
        await asyncio.sleep(0.5)
        pong = await c.ping()
        return {"kind": "flood", "limited": "rate limit" in err["message"], "pong": pong["type"]}


async def dropper(url, i):
    """Start and vanish mid-stream (no stop, no close handshake)."""
    c = await Client.open(url)
    await c.start(prompt=f"dropper {i}")
    await c.wait_for("started", timeout=40)
    await c.next_frame(timeout=20)
    await c._http.close()              # the TCP connection goes with the HTTP session: no close handshake
    return {"kind": "drop"}


ROLES = (streamer, streamer, garbler, flooder, dropper)


def test_fifty_clients_streaming_garbage_flooding_and_dropping(tmp_path):
    spec = toy_spec(tmp_path, blocks=4, delay_ms=20)

    async def go():
        async with serving(spec, max_queue=CLIENTS, replicas=2) as (server, url):
            await asyncio.gather(*(ROLES[i % len(ROLES)](url, i) for i in range(CLIENTS)))   # warm
            base = rss_mib()
            t0 = time.monotonic()
            results = []
            for _ in range(ROUNDS):
                results += await asyncio.gather(*(ROLES[i % len(ROLES)](url, i) for i in range(CLIENTS)))
            elapsed = time.monotonic() - t0
            for _ in range(200):                  # dropped sessions end and their replicas come back
                if not server.manager.active and len(server.manager.free) == 2 and not server.connections:
                    break
                await asyncio.sleep(0.05)
            growth = rss_mib() - base
            async with aiohttp.ClientSession() as http:
                async with http.get(url + "/healthz") as r:
                    healthy = r.status
            state = (len(server.manager.active), len(server.manager.free), len(server.connections))
            sizes = sum((r.batch_sizes for r in server.manager.replicas), collections.Counter())
            return results, elapsed, growth, healthy, state, sizes, server.metrics.frames_dropped

    results, elapsed, growth, healthy, state, sizes, dropped = run(go(), timeout=60)
    kinds = {}
    for r in results:
        kinds.setdefault(r["kind"], []).append(r)
    for r in kinds["stream"]:
        assert r["n"] > 0 and r["sessions"] <= r["mine"], r          # no frame from another session
        assert r["ordered"], r
    assert all(r["errors"] == len(GARBAGE) and r["pong"] == "pong" for r in kinds["garbage"])
    assert all(r["limited"] and r["pong"] == "pong" for r in kinds["flood"])
    assert len(kinds["drop"]) == ROUNDS * CLIENTS // len(ROLES)
    assert healthy == 200 and state == (0, 2, 0), state
    assert growth < RSS_BOUND_MIB, f"RSS grew {growth:.1f} MiB"
    assert max(sizes) > 1, dict(sizes)                               # concurrent sessions shared forwards
    assert sum(r["gaps"] for r in kinds["stream"]) <= dropped         # a gap a client saw is a counted drop
    print(f"soak: {ROUNDS} rounds of {CLIENTS} clients in {elapsed:.1f} s, RSS growth {growth:.1f} MiB (bound {RSS_BOUND_MIB})")
