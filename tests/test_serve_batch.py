"""Batched sessions (issue 22): a session's frames are bit-identical whether it runs alone or in a batch.

Three levels, all on the CPU:
- engine: ``step_together`` of 1-4 tiny Self-Forcing sessions (own prompts, seeds, positions) that join and
  leave at different blocks, one of them switching its prompt mid-stream, against each session's own ``step``;
- model: the Wan DiT with LingBot camera layers (per-block ``y`` and ``camera``), ``run_together`` against
  lone calls, sessions at different frame positions with a sink + ring window ('relative' RoPE);
- serving: headless rollouts on a Replica, started at different times, batched by its scheduler.
The reference is always the same code path run for one session alone (nothing batched).
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

import nodes.wan.dit as wan_dit
from engine.frames import to_uint8_frames
from engine.registry import Registry
from engine.runner import SINKS_NONE, World, open_pipeline
from engine.session import step_together
from engine.spec import load_spec
from nodes.common.causal import BlockCall, StreamSpec
from nodes.common.session_rows import batch_bucket
from nodes.wan.causal import WanDenoiser
from nodes.wan.config import WanConfig
from nodes.wan.dit import CAMERA_CHANNELS, WanDiT

SPEC = "tiny_self_forcing"


@pytest.fixture(scope="module")
def pipeline():
    p = open_pipeline(SPEC, sinks=SINKS_NONE, world=World())
    return p.load()


@pytest.fixture
def batch_sizes(monkeypatch):
    """Batch sizes of the DiT forwards that really ran batched (so a test cannot pass by never batching)."""
    seen: list[int] = []
    orig = wan_dit.WanDiT._run

    def spy(self, *a, sessions=None, **k):
        if sessions is not None:
            seen.append(sessions.size)
        return orig(self, *a, sessions=sessions, **k)

    monkeypatch.setattr(wan_dit.WanDiT, "_run", spy)
    return seen


def _pixels(result):
    return result.outputs["decoder"]["pixels"]


def _alone(pipeline, inputs: dict, blocks: int, switch: tuple[int, str] | None = None) -> list[torch.Tensor]:
    s = pipeline.open_session(**inputs)
    out = []
    for b in range(blocks):
        if switch is not None and b == switch[0]:
            s.set_input("prompt", switch[1])
        out.append(_pixels(s.step()))
    s.close()
    return out


N = 4                                               # sessions: batches of 1, 2, 3, 4, 3, 2, 1 as they join/leave
INPUTS = [dict(prompt=f"session {i}: a fox, take {i}", seed=11 * i + 3) for i in range(N)]
SWITCH = {N - 1: (1, "the last one switches to a snowy forest")}   # session -> (block, new prompt)


@pytest.fixture(scope="module")
def alone(pipeline):
    """Every session's frames run alone (the reference), computed once for the module."""
    blocks = int(pipeline.plan.spec.inputs["num_blocks"])
    return [_alone(pipeline, INPUTS[i], blocks, SWITCH.get(i)) for i in range(N)]


def test_batched_equals_alone_with_join_leave_and_prompt_switch(pipeline, alone, batch_sizes):
    """Session i joins at round i, so batches hold 1, 2, 3, 4 sessions at different positions, then 3, 2, 1
    as the early ones finish; the last one switches its prompt inside a batch."""
    blocks = int(pipeline.plan.spec.inputs["num_blocks"])
    sessions = [pipeline.open_session(**INPUTS[i]) for i in range(N)]
    got: list[list[torch.Tensor]] = [[] for _ in range(N)]
    rnd, sizes = 0, []
    while any(len(g) < blocks for g in got):
        active = [i for i in range(N) if i <= rnd and len(got[i]) < blocks]
        for i in active:
            if i in SWITCH and len(got[i]) == SWITCH[i][0]:
                sessions[i].set_input("prompt", SWITCH[i][1])
        for i, r in zip(active, step_together([sessions[i] for i in active])):
            got[i].append(_pixels(r))
        sizes.append(len(active))
        rnd += 1
    for s in sessions:
        s.close()

    for i in range(N):
        for b in range(blocks):
            assert torch.equal(got[i][b], alone[i][b]), \
                f"session {i} block {b}: max |diff| {(got[i][b] - alone[i][b]).abs().max():.3g}"
    assert {1, 2, 3, 4} <= set(sizes), sizes
    assert set(batch_sizes) == set(sizes) - {1}, (batch_sizes, sizes)   # every multi-session round shared forwards


def test_sessions_see_their_own_prompt_and_seed(pipeline):
    """The negative control of the identity test: different inputs must give different frames in a batch."""
    a, b = (pipeline.open_session(prompt=p, seed=s) for p, s in (("one", 1), ("two", 2)))
    ra, rb = step_together([a, b])
    assert not torch.equal(_pixels(ra), _pixels(rb))
    a.close(), b.close()


# --------------------------------------------------------------------------- model level (LingBot-shaped DiT)
def _cam_model(seed=0) -> WanDenoiser:
    torch.manual_seed(seed)
    cfg = WanConfig(text_len=8, in_dim=8, dim=32, ffn_dim=48, text_dim=8, out_dim=4, num_heads=2, num_layers=2,
                    control_type="cam")
    m = WanDiT(cfg).eval()
    with torch.no_grad():
        m.head.head.weight.normal_(0, 0.2)
    return WanDenoiser(m, cfg, torch.float32, "auto")


def test_run_together_equals_lone_calls_at_different_positions():
    model = _cam_model()
    cfg = model.config
    h, w, f = 4, 6, 2
    spec = StreamSpec(frame_shape=(cfg.out_dim, h, w), frames_per_block=f, sink_frames=1, window_frames=5,
                      rope_mode="relative")
    g = torch.Generator().manual_seed(0)
    starts = [0, 2, 6, 10]              # positions before, at and well past the window wrapping
    texts = [torch.randn(1, cfg.text_len, cfg.text_dim, generator=g) for _ in starts]

    def streams():
        out = []
        for text, start in zip(texts, starts):
            s = model.open_stream(spec)
            s.set_conditions(text=text)
            for fs in range(0, start, f):      # fill each cache up to its position
                x = torch.randn(1, f, cfg.out_dim, h, w, generator=torch.Generator().manual_seed(fs))
                s.commit(x, 0.0, fs, y=torch.zeros(1, f, 4, h, w), camera=torch.zeros(1, CAMERA_CHANNELS, f, h, w))
            out.append(s)
        return out

    calls = []
    for i, start in enumerate(starts):
        calls.append(BlockCall("denoise", torch.randn(1, f, cfg.out_dim, h, w, generator=g), 700.0 - 100 * i, start,
                               {"y": torch.randn(1, f, 4, h, w, generator=g),
                                "camera": torch.randn(1, CAMERA_CHANNELS, f, h, w, generator=g)}))
    lone = [s.denoise(c.x, c.t, c.frame_start, **c.conditions) for s, c in zip(streams(), calls)]
    together_streams = streams()
    together = model.run_together(together_streams, calls)
    for i, (a, b) in enumerate(zip(lone, together)):
        assert torch.equal(a, b), f"row {i}: max |diff| {(a - b).abs().max():.3g}"
    # the commits of a batch leave each cache exactly as lone commits do
    commits = [BlockCall("context", c.x, 0.0, c.frame_start, c.conditions) for c in calls]
    ref = streams()
    for s, c in zip(ref, commits):
        s.commit(c.x, c.t, c.frame_start, **c.conditions)
    model.run_together(together_streams, commits)
    for a, b in zip(ref, together_streams):
        assert torch.equal(a.cache.k, b.cache.k) and torch.equal(a.cache.v, b.cache.v)


def test_batch_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 9]


# --------------------------------------------------------------------------- serving: the replica's scheduler
def test_replica_batches_headless_rollouts_that_join_later(pipeline, alone):
    from flashdreams_cli.serve.sessions import Metrics, Replica, Rollout, SessionManager, stream_source

    registry = Registry.default()
    spec = load_spec(SPEC)
    blocks = int(spec.inputs["num_blocks"])
    inputs = INPUTS[:3]
    ref = [[to_uint8_frames(p) for p in alone[i]] for i in range(3)]

    async def go():
        manager = SessionManager(max_queue=4, max_batch=4, pace="asap")
        replica = Replica(0, stream_source(spec, registry), registry)
        replica.pipeline = pipeline               # the module's loaded pipeline: no second load
        manager.add_replica(replica)
        frames: dict[int, list] = {i: [] for i in range(3)}
        ended = []
        rollouts = []

        async def start(i):
            ticket = manager.enqueue(lambda pos: None)
            rep = await ticket.granted
            r = Rollout(manager, rep, None, Metrics(), inputs=dict(inputs[i]), blocks=blocks, quality=85,
                        requested_at=0.0, on_block=lambda out, i=i: frames[i].append(out.frames))
            r.on_end = ended.append
            r.start()
            rollouts.append(r)
            return r

        await start(0)
        while len(frames[0]) < 1:                  # the others join once rollout 0 is past block 0
            await asyncio.sleep(0.01)
        await start(1)
        await start(2)
        for _ in range(3000):
            if len(ended) == 3:
                break
            await asyncio.sleep(0.01)
        replica.shutdown()
        return frames, ended, replica.batch_sizes, manager

    frames, ended, sizes, manager = asyncio.run(go())
    assert [r.stop_reason for r in ended] == ["done"] * 3
    for i in range(3):
        assert len(frames[i]) == blocks
        for b in range(blocks):
            assert np.array_equal(frames[i][b], ref[i][b]), f"rollout {i} block {b}"
    assert max(sizes) >= 2, dict(sizes)            # the late joiners were batched with the others
    assert manager.stats()["replicas"][0]["sessions"] == 0 and not manager.live


def test_two_expert_model_runs_together_like_alone():
    """Wan 2.2's TimestepExperts: batched denoise calls go to each call's expert, commits to every expert."""
    from nodes.common.causal import TimestepExperts
    high, low = _cam_model(seed=1), _cam_model(seed=2)
    model = TimestepExperts([(875.0, high), (0.0, low)])
    cfg = high.config
    h, w, f = 4, 6, 2
    spec = StreamSpec(frame_shape=(cfg.out_dim, h, w), frames_per_block=f, max_frames=8)
    g = torch.Generator().manual_seed(3)
    texts = [torch.randn(1, cfg.text_len, cfg.text_dim, generator=g) for _ in range(3)]

    def streams():
        out = []
        for text in texts:
            s = model.open_stream(spec)
            s.set_conditions(text=text)
            out.append(s)
        return out

    conds = lambda: {"y": torch.randn(1, f, 4, h, w, generator=g),  # noqa: E731
                     "camera": torch.randn(1, CAMERA_CHANNELS, f, h, w, generator=g)}
    calls = [BlockCall("denoise", torch.randn(1, f, cfg.out_dim, h, w, generator=g), t, 0, conds())
             for t in (999.0, 500.0, 900.0)]                     # high, low, high expert
    commits = [BlockCall("context", c.x, 0.0, 0, c.conditions) for c in calls]
    lone_streams, batch_streams = streams(), streams()
    lone = [s.denoise(c.x, c.t, c.frame_start, **c.conditions) for s, c in zip(lone_streams, calls)]
    together = model.run_together(batch_streams, calls)
    assert all(torch.equal(a, b) for a, b in zip(lone, together))
    for s, c in zip(lone_streams, commits):
        s.commit(c.x, c.t, c.frame_start, **c.conditions)
    assert model.run_together(batch_streams, commits) == [None] * 3
    for a, b in zip(lone_streams, batch_streams):
        for ea, eb in zip(a.streams, b.streams):
            assert torch.equal(ea.cache.k, eb.cache.k) and torch.equal(ea.cache.v, eb.cache.v)
