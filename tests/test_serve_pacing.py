"""Real-time pacing of fd serve (issue 22): each session is generated at its spec's fps, one block ahead of
playback; the time a paced session does not need goes to the others (an ``asap`` session soaks it up).

The scheduler's decisions (``Pacer`` + ``due_batch``) are checked on a fake clock over a long simulated run
with a simulated GPU cost per batch; the real server is checked on loopback with the toy spec."""
from __future__ import annotations

import asyncio
import time

import pytest

from flashdreams_cli.serve.client import Client, Frame
from flashdreams_cli.serve.sessions import Pacer, due_batch
from test_serve import run, serving, toy_spec

TOLERANCE = 0.10


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Sim:
    """A rollout as the scheduler sees it."""

    def __init__(self, seq, fps, pace, clock):
        self.seq, self.pacer, self.times, self.frames = seq, Pacer(fps, pace, clock), [], 0


def simulate(fps: float, block_frames: int, paces: list[str], cost, seconds: float, max_batch: int = 8):
    """Run the replica's loop on a fake clock: batches of due rollouts cost ``cost(n)`` seconds."""
    clock = FakeClock()
    sims = [Sim(i, fps, p, clock) for i, p in enumerate(paces)]
    end = clock.t + seconds
    while clock.t < end:
        batch = due_batch(sims, clock.t, max_batch)
        if not batch:
            clock.t = min(s.pacer.due() for s in sims)     # the pump sleeps until the next due time
            continue
        clock.t += cost(len(batch))
        for s in batch:
            s.pacer.delivered(block_frames)
            s.times.append(clock.t)
            s.frames += block_frames
    return sims


def paced_fps(times: list[float], block_frames: int) -> float:
    """Generation rate from block 1 on (block 0 starts playback and block 1 is its one-block lead)."""
    return block_frames * (len(times) - 2) / (times[-1] - times[1])


@pytest.mark.parametrize("fps,block_frames", [(16, 12), (8, 2), (30, 4)])
def test_realtime_sessions_hold_fps_and_asap_gets_the_rest(fps, block_frames):
    cost = lambda n: 0.02 + 0.01 * n            # a GPU that could run ~40 blocks/s alone  # noqa: E731
    sims = simulate(fps, block_frames, ["realtime"] * 3 + ["asap"], cost, seconds=60)
    for s in sims[:3]:
        got = paced_fps(s.times, block_frames)
        assert abs(got - fps) <= TOLERANCE * fps, f"realtime session at {got:.2f} fps, spec {fps}"
        assert abs(s.pacer.fps_measured() - fps) <= TOLERANCE * fps      # what /metrics reports
    asap = paced_fps(sims[3].times, block_frames)
    alone = block_frames / cost(1)
    assert asap > 3 * fps and asap > 0.5 * alone, f"asap session only got {asap:.1f} fps"


def test_realtime_session_alone_is_not_generated_faster_than_fps():
    """The issue's symptom: a tiny spec generating ~200 frames/s for a page playing 16 fps."""
    sims = simulate(16, 12, ["realtime"], lambda n: 0.06, seconds=30)     # 200 frames/s possible
    got = paced_fps(sims[0].times, 12)
    assert abs(got - 16) <= TOLERANCE * 16, got


def test_overloaded_gpu_degrades_every_session_alike():
    """More realtime demand than the GPU can serve: nobody starves; everyone gets about the same share."""
    sims = simulate(16, 12, ["realtime"] * 4, lambda n: 0.2 * n, seconds=60, max_batch=2)
    rates = [paced_fps(s.times, 12) for s in sims]
    assert max(rates) - min(rates) <= TOLERANCE * max(rates), rates
    assert all(r < 16 for r in rates)


def test_pacer_restart_and_asap_switch():
    clock = FakeClock()
    p = Pacer(10, "realtime", clock)
    assert p.due() == float("-inf")                 # block 0: at once
    p.delivered(5)
    assert p.due() == clock.t                       # block 1: the one-block lead, at once
    p.delivered(5)
    assert p.due() == pytest.approx(clock.t + 0.5)  # block 2: once block 1 starts playing
    p.restart()
    assert p.due() == float("-inf")
    p.pace = "asap"
    p.delivered(5), p.delivered(5)
    assert p.due() == float("-inf")
    with pytest.raises(ValueError):
        Pacer(10, "fast", clock)


async def _stream(url: str, pace: str, blocks: int) -> list[tuple[float, Frame]]:
    async with Client.connect(url) as c:
        await c.start(prompt=f"{pace} client", blocks=blocks, pace=pace)
        frames = []
        while True:
            item = await c.recv(timeout=30)
            if isinstance(item, Frame):
                frames.append((time.monotonic(), item))
            elif item["type"] == "done":
                return frames
            elif item["type"] == "error":
                raise AssertionError(item["message"])


def test_server_paces_sessions_on_loopback(tmp_path):
    """Two realtime clients and an asap one share a replica: the realtime ones arrive at the spec's fps
    (toy spec: 8 fps, 2 frames a block), the asap one is done long before them."""
    blocks = 10
    spec = toy_spec(tmp_path, blocks=blocks)

    async def go():
        async with serving(spec) as (server, url):
            fps = server.source.fps
            results = await asyncio.gather(_stream(url, "realtime", blocks), _stream(url, "realtime", blocks),
                                           _stream(url, "asap", blocks))
            return fps, results, server.manager.replicas[0].batch_sizes

    fps, results, sizes = run(go(), timeout=40)
    for frames in results[:2]:
        firsts = [(t, f.header.index) for t, f in frames if f.header.block >= 1 and f.header.index % 2 == 0]
        (t1, i1), (tn, i_n) = firsts[0], firsts[-1]
        got = (i_n - i1) / (tn - t1)
        assert abs(got - fps) <= TOLERANCE * fps, f"realtime client at {got:.2f} fps, spec {fps}"
    assert results[2][-1][0] < min(results[0][-1][0], results[1][-1][0])
    assert max(sizes) >= 2, dict(sizes)            # the two realtime sessions shared blocks
