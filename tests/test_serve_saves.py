"""`fd serve` save / branch: a branch from a saved point replays the same frames, or new ones under a new prompt."""
from __future__ import annotations

import asyncio
import contextlib

from engine.registry import Registry
from engine.spec import load_spec
from flashdreams_cli.serve import ServeConfig, Server
from flashdreams_cli.serve.client import Client


@contextlib.asynccontextmanager
async def serving(spec):
    server = Server(spec, ServeConfig(port=0), registry=Registry.default())
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


async def frames_of(c, session, blocks):
    """JPEG bytes per block of ``session`` until ``blocks`` blocks are complete."""
    out: dict[int, list[bytes]] = {}
    while len([b for b in out if b in blocks]) < len(blocks) or not all(
            out.get(b) and out[b][-1] is None for b in blocks):
        item = await c.recv(timeout=30)
        if isinstance(item, dict) or item.header.session != session:
            continue
        out.setdefault(item.header.block, []).append(item.jpeg)
        if item.header.last_in_block:
            out[item.header.block].append(None)
    return {b: out[b] for b in blocks}


def test_branch_from_a_saved_point(tmp_path):
    spec = load_spec("tiny_self_forcing", ["inputs.num_blocks=4", f"sinks.video.params.path={tmp_path / 'x.mp4'}"])

    async def go():
        async with serving(spec) as url, Client.connect(url) as c:
            await c.start(prompt="a red fox", quality=95)
            s1 = (await c.wait_for("started", timeout=60))["session"]
            await c.wait_for("block", timeout=60)
            await c.pause()
            paused = await c.wait_for("paused")
            await c.send({"type": "save"})
            saved = await c.wait_for("saved")
            assert saved["save"] == 1 and saved["block"] == paused["block"]
            await c.resume()
            rest = set(range(saved["block"], 4))
            first = await frames_of(c, s1, rest)
            await c.wait_for("done", timeout=60)
            await c.send({"type": "branch", "save": 1})
            br = await c.wait_for("branched")
            assert br["previous"] == s1 and br["block"] == saved["block"]
            again = await frames_of(c, br["session"], rest)
            await c.wait_for("done", timeout=60)
            await c.send({"type": "branch", "save": 1, "prompt": "a lighthouse in a storm"})
            br2 = await c.wait_for("branched")
            other = await frames_of(c, br2["session"], rest)
            await c.send({"type": "branch", "save": 9})
            err = await c.wait_for("error")
            return first, again, other, err

    first, again, other, err = asyncio.run(asyncio.wait_for(go(), 120))
    assert again == first                          # same snapshot, same inputs: the same JPEG bytes
    assert other != first                          # a new prompt from the same point: another continuation
    assert "no saved point 9" in err["message"]


def test_save_and_branch_messages_are_checked():
    import pytest

    from flashdreams_cli.serve import ProtocolError, parse_message
    assert parse_message('{"type": "save"}') == {"type": "save"}
    assert parse_message('{"type": "branch", "save": 2, "prompt": "x"}')["save"] == 2
    for bad in ('{"type": "branch"}', '{"type": "branch", "save": 0}', '{"type": "branch", "save": "1"}',
                '{"type": "save", "name": "a"}', '{"type": "branch", "save": 1, "prompt": 3}'):
        with pytest.raises(ProtocolError):
            parse_message(bad)


def test_hello_names_the_prompt_switch_mode(tmp_path):
    from flashdreams_cli.serve.server import prompt_switch_mode
    assert prompt_switch_mode(load_spec("tiny_self_forcing")) == "keep"
    assert prompt_switch_mode(load_spec("tiny_self_forcing", ["nodes.sampler.params.prompt_switch=recache"])) == "recache"
    assert prompt_switch_mode(load_spec("preview_cpu")) is None
