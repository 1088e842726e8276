"""fd serve over loopback: protocol, prompt switch with kept state, pause/resume/reset, bad messages,
disconnect mid-block, queueing, idle timeout and tokens. A toy spec from engine_fixtures nodes runs in ms."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time

import aiohttp
import numpy as np
import pytest
import torch

import engine_fixtures
from engine import Node, Param, Port
from engine.plan import make_plan
from engine.session import Pipeline
from engine.spec import load_spec
from engine.types import ANY, LATENT, PIXELS
from flashdreams_cli.serve import FrameHeader, ProtocolError, ServeConfig, Server, parse_message
from flashdreams_cli.serve.client import Client, ServerClosed
from flashdreams_cli.serve.encode import JpegDecoder, JpegEncoder
from flashdreams_cli.serve.sessions import Outbox, stream_source
from engine.frames import to_uint8_frames

JPEG_TOL = 6          # max |decoded - exact| in uint8 levels for flat 8x8 tiles at quality 95


class Slow(Node):
    type_name = "test.slow"
    doc = "Passes a latent through after sleeping: makes 'mid-block' a window a test can hit."
    inputs = (Port("latent", LATENT),)
    outputs = (Port("latent", LATENT),)
    params = (Param("ms", int, 0, "sleep per block", min=0, max=5000),)

    def run(self, inputs, state, step):
        time.sleep(self.p.ms / 1000)
        return {"latent": inputs["latent"]}


class CameraShift(Node):
    type_name = "test.camera_shift"
    doc = "Adds the sum of a camera vector run input to the latent (a stand-in for camera conditioning)."
    inputs = (Port("latent", LATENT), Port("camera", ANY))
    outputs = (Port("latent", LATENT),)

    def run(self, inputs, state, step):
        return {"latent": inputs["latent"] + float(sum(inputs["camera"]))}


class Rings(Node):
    type_name = "test.rings"
    doc = "Moving colour rings whose hue follows the latent value: a picture a person can judge in a screenshot."
    inputs = (Port("latent", LATENT),)
    outputs = (Port("pixels", PIXELS),)
    params = (Param("width", int, 320), Param("height", int, 180), Param("frames", int, 4),
              Param("grain", float, 0.0, "film grain: noise makes big JPEGs (to fill sockets fast)"))

    def run(self, inputs, state, step):
        v = float(inputs["latent"].mean())
        h, w, n = self.p.height, self.p.width, self.p.frames
        y = torch.linspace(-1, 1, h)[:, None] * h / w
        x = torch.linspace(-1, 1, w)[None, :]
        r = (x ** 2 + y ** 2).sqrt()
        out = []
        for i in range(n):
            t = (step.block * n + i) * 0.35
            phase = 12 * r - t
            out.append(torch.stack([torch.sin(phase + 2 * v), torch.sin(phase + 2 * v + 2.1),
                                    torch.sin(phase + 2 * v + 4.2)]) * (1 - 0.6 * r.clamp(max=1)))
        pixels = torch.stack(out)[None]
        if self.p.grain:
            pixels = pixels + self.p.grain * torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0))
        return {"pixels": pixels.clamp(-1, 1)}


def rings_spec(tmp_path, blocks: int = 400, delay_ms: int = 120, size: tuple[int, int] = (320, 180),
               grain: float = 0.0):
    (tmp_path / "rings.yaml").write_text(f"""\
name: rings_demo
description: browser test stream (prompt -> encoder -> accumulator -> rings)
inputs:
  prompt: hello
  seed: 0
  num_blocks: {blocks}
nodes:
  enc:
    type: test.encoder
    in: {{prompt: inputs.prompt}}
  acc:
    type: test.accumulate
    in: {{embeds: enc.embeds}}
    params: {{gain: 0.01}}
  slow:
    type: test.slow
    in: {{latent: acc.latent}}
    params: {{ms: {delay_ms}}}
  rings:
    type: test.rings
    in: {{latent: slow.latent}}
    params: {{width: {size[0]}, height: {size[1]}, grain: {grain}}}
sinks:
  video:
    type: sink.mp4
    in: {{frames: rings.pixels}}
    params: {{path: {tmp_path / "never.mp4"}, fps: 30}}
    main: true
""")
    return load_spec(tmp_path / "rings.yaml")


def registry():
    reg = engine_fixtures.registry()
    for t in (Slow, CameraShift, Rings):
        reg.add(t)
    return reg


def toy_spec(tmp_path, blocks: int = 6, delay_ms: int = 0, camera: bool = False):
    """Prompt encoder (session phase) -> stateful accumulator -> preview decoder -> an MP4 main sink."""
    shift = ("  cam:\n    type: test.camera_shift\n    in: {latent: slow.latent, camera: inputs.camera}\n"
             if camera else "")
    text = f"""\
name: toy_stream
description: toy stream for serve tests
inputs:
  prompt: hello
  seed: 0
  num_blocks: {blocks}
  gain: 0.003
{"  camera: [0.0, 0.0, 0.0, 0.0]" if camera else ""}
nodes:
  enc:
    type: test.encoder
    in: {{prompt: inputs.prompt}}
  acc:
    type: test.accumulate
    in: {{embeds: enc.embeds}}
    params: {{gain: "${{inputs.gain}}"}}
  slow:
    type: test.slow
    in: {{latent: acc.latent}}
    params: {{ms: {delay_ms}}}
{shift}  decoder:
    type: tensor.latent_preview
    in: {{latent: {"cam" if camera else "slow"}.latent}}
    params: {{scale: 8, temporal: 2}}
sinks:
  video:
    type: sink.mp4
    in: {{frames: decoder.pixels}}
    params: {{path: {tmp_path / "must_not_exist.mp4"}, fps: 8}}
    main: true
"""
    path = tmp_path / "toy.yaml"
    path.write_text(text)
    return load_spec(path)


def run(coro, timeout: float = 25.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def serving(spec, **config):
    server = Server(spec, ServeConfig(port=0, **config), registry=registry())
    await server.start()
    try:
        yield server, f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


def reference_frames(spec, prompts_at: dict[int, str], blocks: int) -> dict[int, np.ndarray]:
    """Frames per block from the engine directly: prompt switches at given blocks, state kept."""
    pipe = Pipeline(make_plan(stream_source(spec, registry()).served, registry()))
    out = {}
    with pipe.open_session(prompt=prompts_at[0]) as s:
        for b in range(blocks):
            if b in prompts_at and b > 0:
                s.set_input("prompt", prompts_at[b])
            r = s.step()
            out[b] = to_uint8_frames(r.outputs["decoder"]["pixels"])
    return out


def by_block(frames) -> dict[int, np.ndarray]:
    dec, out = JpegDecoder(), {}
    for f in frames:
        out.setdefault(f.header.block, []).append(f.image(dec))
    return {b: np.stack(v) for b, v in out.items()}


def max_diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# --------------------------------------------------------------------------- unit: protocol, outbox, jpeg
def test_parse_message_checks_every_field():
    assert parse_message('{"type": "start", "prompt": "a", "seed": 3, "options": {"quality": 90}}')["seed"] == 3
    assert parse_message('{"type": "camera", "value": [1, 2.5]}')["value"] == [1.0, 2.5]
    assert parse_message('{"type": "start", "options": {"pace": "asap"}}')["options"]["pace"] == "asap"
    bad = ['nope', '[1]', '{"type": "launch"}', '{"type": "start", "seed": "7"}', '{"type": "start", "seed": -1}',
           '{"type": "start", "seed": true}', '{"type": "start", "colour": 1}', '{"type": "prompt"}',
           '{"type": "prompt", "prompt": 5}', json.dumps({"type": "prompt", "prompt": "x" * 2001}),
           '{"type": "camera", "value": [NaN]}', '{"type": "camera", "value": "left"}',
           '{"type": "start", "options": {"blocks": 0}}', '{"type": "start", "options": {"speed": 2}}',
           '{"type": "start", "options": {"pace": "warp"}}', '{"type": "start", "options": {"pace": 1}}',
           '{"type": "pause", "now": true}', json.dumps({"type": "ping", "pad": "x" * 20000}), b"\x00\x01"]
    for text in bad:
        with pytest.raises(ProtocolError):
            parse_message(text)


def test_frame_header_round_trip_and_rejects_garbage():
    h = FrameHeader(session=7, block=3, index=41, width=832, height=480, timestamp_ms=1.5e12, last_in_block=True)
    back, jpeg = FrameHeader.unpack(h.pack(b"\xff\xd8jpeg"))
    assert back == h and jpeg == b"\xff\xd8jpeg"
    with pytest.raises(ProtocolError):
        FrameHeader.unpack(b"XX" + h.pack(b"")[2:])


def test_outbox_keeps_latest_frames_and_control_first():
    async def go():
        box = Outbox(max_frames=2)
        for i in range(5):
            box.push_frame(bytes([i]))
        box.push_json({"type": "block"})
        got = [await box.get() for _ in range(3)]
        assert got == [{"type": "block"}, b"\x03", b"\x04"] and box.dropped == 3
        box.close()
        assert await box.get() is None
    run(go())


def test_jpeg_round_trip_odd_size():
    rgb = np.zeros((17, 23, 3), np.uint8)
    rgb[:, :, 0] = 200
    img = JpegDecoder().decode(JpegEncoder(95).encode(rgb))
    assert img.shape == (18, 24, 3) and max_diff(img[:17, :23], rgb) <= JPEG_TOL


# --------------------------------------------------------------------------- streaming
def test_frames_arrive_in_order_and_no_file_sink_runs(tmp_path):
    spec = toy_spec(tmp_path, blocks=4)

    async def go():
        async with serving(spec) as (server, url):
            async with Client.connect(url) as c:
                assert c.hello["has_prompt"] and c.hello["controls"] == [] and c.hello["fps"] == 8
                assert c.hello["frame_size"] == [16, 16]
                await c.start(prompt="hello")
                started = await c.wait_for("started")
                done, frames = await c.collect_until("done")
                assert done["blocks"] == 4
                assert [f.header.index for f in frames] == list(range(8))
                assert [f.header.block for f in frames] == [0, 0, 1, 1, 2, 2, 3, 3]
                assert {f.header.session for f in frames} == {started["session"]}
                assert [f.header.last_in_block for f in frames] == [False, True] * 4
                blocks = [m["block"] for m in c.messages if m["type"] == "block"]
                assert blocks == [0, 1, 2, 3]
                ref = reference_frames(spec, {0: "hello"}, 4)
                for b, imgs in by_block(frames).items():
                    assert max_diff(imgs, ref[b]) <= JPEG_TOL
                async with aiohttp.ClientSession() as http:
                    async with http.get(url + "/metrics.json") as r:      # /metrics is Prometheus text
                        m = await r.json()
                    assert m["blocks_served"] >= 4 and m["active_session"] == started["session"]
                    assert m["first_frame_ms"]["count"] == 1 and m["block_ms"]["count"] >= 4
                    async with http.get(url + "/healthz") as r:
                        assert r.status == 200
                    async with http.get(url + "/") as r:
                        page = await r.text()
                    assert "app.js" in page and "http" not in page.replace("http-equiv", "")
        assert not (tmp_path / "must_not_exist.mp4").exists()
    run(go())


def test_prompt_switch_reencodes_and_keeps_state(tmp_path):
    blocks = 8
    spec = toy_spec(tmp_path, blocks=blocks, delay_ms=60)

    async def go():
        async with serving(spec) as (server, url):
            async with Client.connect(url) as c:
                engine_fixtures.FakeEncoder.calls.clear()
                await c.start(prompt="hello", quality=95)
                await c.wait_for("started")
                first, frames = await c.collect_until("block")
                assert first["block"] == 0
                await c.pause()
                paused, more = await c.collect_until("paused")
                k = paused["block"]
                assert 1 <= k < blocks
                await c.prompt("world")
                switched, more2 = await c.collect_until("prompt")
                assert switched["block"] == k
                await c.resume()
                done, rest = await c.collect_until("done", timeout=15)
                return k, frames + more + more2 + rest

    k, frames = run(go())
    # the encoder ran once for each prompt, not again for every block, and never from a reset
    assert engine_fixtures.FakeEncoder.calls == ["hello", "world"]
    got = by_block(frames)
    assert sorted(got) == list(range(blocks))
    kept = reference_frames(spec, {0: "hello", k: "world"}, blocks)
    restarted = reference_frames(spec, {0: "world"}, blocks - k)     # what a reset at the switch would show
    for b in range(blocks):
        assert max_diff(got[b], kept[b]) <= JPEG_TOL, f"block {b} differs from the state-keeping reference"
    assert max_diff(got[k], restarted[0]) > 4 * JPEG_TOL, "the switch must not restart the accumulated state"
    # state continues: block k is further from the zero state (grey 127/128) than block k-1 was
    grey = np.full_like(got[k], 128)
    assert max_diff(got[k], grey) > max_diff(got[k - 1], grey)


def test_pause_resume_and_reset(tmp_path):
    spec = toy_spec(tmp_path, blocks=6, delay_ms=40)

    async def go():
        async with serving(spec) as (server, url):
            async with Client.connect(url) as c:
                await c.start(prompt="hello", quality=95)
                s1 = (await c.wait_for("started"))["session"]
                first, frames = await c.collect_until("block")
                await c.pause()
                paused, _ = await c.collect_until("paused")
                # nothing new is generated while paused
                quiet_until = time.monotonic() + 0.4
                while time.monotonic() < quiet_until:
                    with contextlib.suppress(asyncio.TimeoutError):
                        item = await c.recv(timeout=max(0.01, quiet_until - time.monotonic()))
                        assert not (isinstance(item, dict) and item["type"] == "block")
                        assert isinstance(item, dict) or item.header.block < paused["block"]
                await c.resume()
                await c.wait_for("resumed")
                nxt = await c.wait_for("block")
                assert nxt["block"] == paused["block"]
                await c.reset()
                reset = await c.wait_for("reset")
                assert reset["previous"] == s1 and reset["session"] != s1
                f = await c.next_frame()
                while f.header.session != reset["session"]:
                    f = await c.next_frame()
                assert f.header.block == 0 and f.header.index == 0
                return c.frames[0], f

    before, after = run(go())
    assert max_diff(before.image(), after.image()) <= JPEG_TOL     # fresh state: block 0 again


def test_bad_messages_get_errors_and_session_survives(tmp_path):
    spec = toy_spec(tmp_path, blocks=6, delay_ms=30)

    async def go():
        async with serving(spec) as (server, url):
            async with Client.connect(url) as c:
                await c.send({"type": "pause"})
                assert "no active session" in (await c.wait_for("error"))["message"]
                await c.start(prompt="hello")
                started = await c.wait_for("started")
                bad = {"not json": "not JSON", '{"type": "warp"}': "unknown message type",
                       '{"type": "start", "prompt": "again"}': "already running",
                       '{"type": "prompt", "prompt": 1}': "must be a string",
                       '{"type": "camera", "value": [1, 2]}': "no camera input",
                       json.dumps({"type": "prompt", "prompt": "y" * 30000}): "too large"}
                for text, why in bad.items():
                    await c.ws.send_str(text)
                    assert why in (await c.wait_for("error"))["message"]
                await c.ws.send_bytes(b"\x00" * 10)
                assert "binary" in (await c.wait_for("error"))["message"]
                done, _ = await c.collect_until("done")
                assert done["session"] == started["session"] and done["blocks"] == 6
    run(go())


def test_camera_input_reaches_the_session(tmp_path):
    spec = toy_spec(tmp_path, blocks=4, delay_ms=60, camera=True)

    async def go():
        async with serving(spec) as (server, url):
            async with Client.connect(url) as c:
                assert c.hello["controls"] == ["camera"]
                await c.start(prompt="hello", quality=95)
                await c.wait_for("block")
                await c.pause()
                paused = await c.wait_for("paused")
                await c.control("camera", [0.5, 0.0, 0.0, 0.0])
                await c.resume()
                done, frames = await c.collect_until("done")
                assert server.manager.rollouts()[0].inputs["camera"] == [0.5, 0.0, 0.0, 0.0]
                return paused["block"], frames

    k, frames = run(go())
    got = by_block(frames)
    ref = reference_frames(toy_spec(tmp_path, blocks=4, camera=False), {0: "hello"}, 4)
    assert max_diff(got[k], ref[k]) > 4 * JPEG_TOL     # the camera offset changed what was drawn


def test_disconnect_mid_block_frees_the_replica(tmp_path):
    spec = toy_spec(tmp_path, blocks=3, delay_ms=400)

    async def go():
        async with serving(spec, max_batch=1) as (server, url):     # one slot: b waits in the queue
            b = await Client.open(url)
            async with Client.connect(url) as a:
                await a.start(prompt="hello")
                await a.wait_for("started")
                await asyncio.sleep(0.1)            # block 0 is running in the replica thread now
                assert server.manager.rollouts()[0].in_block
                await b.start(prompt="world")
                assert (await b.wait_for("queue"))["position"] == 1
            t0 = time.monotonic()                   # a is gone, mid-block
            started = await b.wait_for("started", timeout=5)
            assert time.monotonic() - t0 < 2.0
            assert server.metrics_snapshot()["active_session"] == started["session"]
            f = await b.next_frame()
            assert f.header.session == started["session"] and f.header.block == 0
            await b.close()
            return f

    f = run(go())
    ref = reference_frames(spec, {0: "world"}, 1)      # fresh state for the next client
    assert max_diff(f.image(), ref[0][0]) <= 3 * JPEG_TOL


def test_queue_positions_and_queue_full(tmp_path):
    spec = toy_spec(tmp_path, blocks=2, delay_ms=150)

    async def go():
        async with serving(spec, max_queue=1, max_batch=1) as (server, url):   # one slot, one waiting
            async with Client.connect(url) as a, Client.connect(url) as b, Client.connect(url) as c:
                await a.start()
                await a.wait_for("started")
                await b.start()
                assert (await b.wait_for("queue"))["position"] == 1
                await c.start()
                assert "busy" in (await c.wait_for("error"))["message"]
                await b.stop()                       # leaving the queue is allowed
                assert (await b.wait_for("stopped"))["session"] is None
                await a.wait_for("done")
                await a.stop()
                await a.wait_for("stopped")
                await c.start()
                await c.wait_for("started")
    run(go())


def test_idle_session_is_freed(tmp_path):
    spec = toy_spec(tmp_path, blocks=1)

    async def go():
        async with serving(spec, idle_timeout=0.4) as (server, url):
            async with Client.connect(url) as c:
                await c.start()
                await c.wait_for("done")
                stopped = None
                for _ in range(50):                          # pings (as the page sends) are not activity
                    await c.send({"type": "ping", "t": 0})
                    with contextlib.suppress(asyncio.TimeoutError):
                        stopped = await c.wait_for("stopped", timeout=0.1)
                        break
                assert stopped is not None and stopped["reason"] == "idle" and not server.manager.active
                assert len(server.manager.free) == 1
    run(go())


def test_token_required(tmp_path):
    spec = toy_spec(tmp_path, blocks=1)

    async def go():
        async with serving(spec, token="s3cret") as (server, url):
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await Client.open(url, token="wrong")
            assert e.value.status == 401
            async with Client.connect(url) as c:          # no token in the URL: the first message must be auth
                assert c.hello["auth_required"] and "spec" not in c.hello     # nothing shown before the token
                await c.start()
                assert "unauthorized" in (await c.wait_for("error"))["message"]
                with pytest.raises(ServerClosed):
                    await c.wait_for("started", timeout=3)
                assert c.ws.close_code == 4401
            async with Client.connect(url, token="s3cret", token_in_query=False) as c:
                assert c.hello["spec"] == "toy_stream" and not c.hello["auth_required"]
                await c.start()
                await c.wait_for("done")
            async with Client.connect(url, token="s3cret") as c:
                assert not c.hello["auth_required"]
                await c.start()
                await c.wait_for("done")
            async with aiohttp.ClientSession() as http:
                async with http.get(url + "/metrics") as r:
                    assert r.status == 401
                async with http.get(url + "/metrics", headers={"Authorization": "Bearer s3cret"}) as r:
                    assert r.status == 200
                async with http.get(url + "/healthz") as r:
                    assert r.status == 200
    run(go())


def test_server_refuses_a_spec_without_a_video_sink(tmp_path):
    from engine.errors import FdError
    p = engine_fixtures.write(tmp_path, engine_fixtures.GOOD)
    with pytest.raises(FdError, match="frames"):
        Server(load_spec(p), ServeConfig(port=0), registry=registry())
