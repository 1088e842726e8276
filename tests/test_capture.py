"""CUDA-graph capture on the CPU: the planner's decisions and the dispatch bookkeeping.

Graph semantics (static inputs copied in, outputs written into the same buffers, one
graph per key) are checked with engine.capture.EagerBackend, which re-runs the
captured call on replay; the GPU proof that a real replay equals eager is
benchmarks/gpu_check.py.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.capture import EagerBackend, GraphCache, StaticTensors
from engine.node import BLOCK, SESSION, Node
from engine.plan import CaptureDecision, decide_capture
from nodes.ar.rollout import ARRollout
from nodes.ar.schedule import ARSchedule
from nodes.samplers.flow_match import FlowMatchTable
from nodes.wan.config import WanConfig
from nodes.wan.causal import CausalDenoiser
from nodes.wan.dit import WanDiT
from nodes.common.kv_cache import SelfKVCache
from nodes.wan.vae import WanVAE
from nodes.wan.vae_stream import StreamingDecoder

torch.set_num_threads(2)


# ------------------------------------------------------------------ planner decisions
class _Static(Node):
    type_name = "test.static"
    capturable = True


class _Dynamic(Node):
    type_name = "test.dynamic"


class _Once(Node):
    type_name = "test.once"
    capturable = True
    phase = SESSION


@pytest.mark.parametrize("cls, requested, device, captured, why", [
    (_Static, None, "cuda:0", True, "static shapes"),
    (_Static, True, "cuda:1", True, "static shapes"),
    (_Static, False, "cuda:0", False, "capture: false"),
    (_Static, None, "cpu", False, "CUDA device"),
    (_Dynamic, None, "cuda:0", False, "dynamic shapes"),
    (_Dynamic, True, "cuda:0", False, "dynamic shapes"),
    (_Once, None, "cuda:0", False, "once per session"),
])
def test_decide_capture(cls, requested, device, captured, why):
    d = decide_capture(cls, requested, device)
    assert d.captured is captured and why in d.reason
    assert cls.phase in (BLOCK, SESSION)


def test_nodes_receive_the_plans_decisions_as_their_context(tmp_path):
    """The planner's device and capture decision reach each node once, in its NodeContext: the plan is
    a value (frozen, no live nodes) and the engine sets nothing on a node after building it."""
    import dataclasses

    from engine.node import NodeContext
    from engine.plan import NodePlan
    from engine.placement import Placement
    np_ = NodePlan("a", _Static, {}, BLOCK, Placement("cuda:1", "set"), CaptureDecision(True, "ok"), None, {})
    node = np_.build()
    assert node.ctx == NodeContext(device="cuda:1", capture=True, capture_reason="ok")
    assert node.device == "cuda:1" and node.parallel is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        np_.capture = CaptureDecision(False, "changed")
    with pytest.raises(AttributeError):
        node.device = "cpu"


# ------------------------------------------------------------------ dispatch bookkeeping
def _counting_fn():
    calls = []

    def fn(x, y):
        calls.append(1)
        return x * 2 + y, (x - y,)
    return fn, calls


def test_graph_cache_warmup_capture_replay_per_key():
    fn, _ = _counting_fn()
    backend = EagerBackend()
    gc = GraphCache(fn, backend=backend, warmup=1)
    for i in range(4):
        x, y = torch.randn(3), torch.randn(3)
        out, (diff,) = gc(("a", 3), x, y)
        torch.testing.assert_close(out, x * 2 + y)
        torch.testing.assert_close(diff, x - y)
    assert backend.calls == ["warm", "capture", "replay", "replay", "replay"]
    assert gc.stats.captured == 1 and gc.stats.replayed == 3 and gc.stats.eager == 1
    gc(("b", 5), torch.randn(5), torch.randn(5))  # a new key warms up on its own
    gc(("b", 5), torch.randn(5), torch.randn(5))
    assert len(gc.entries) == 2 and gc.stats.captured == 2
    assert gc.status() == "captured 2 graphs, replayed 4 times, 2 eager calls"


def test_graph_cache_outputs_cloned_or_shared():
    fn, _ = _counting_fn()
    gc = GraphCache(fn, backend=EagerBackend(), warmup=0)
    first, _ = gc(0, torch.ones(2), torch.zeros(2))
    gc(0, torch.full((2,), 5.0), torch.zeros(2))
    assert first.tolist() == [2.0, 2.0]          # a clone survives the next replay
    shared = GraphCache(fn, backend=EagerBackend(), warmup=0, clone_outputs=False)
    a, _ = shared(0, torch.ones(2), torch.zeros(2))
    b, _ = shared(0, torch.full((2,), 5.0), torch.zeros(2))
    assert a is b and a.tolist() == [10.0, 10.0]  # the graph's own buffer, overwritten


def test_graph_cache_rejects_other_shapes_and_clears():
    fn, _ = _counting_fn()
    gc = GraphCache(fn, backend=EagerBackend(), warmup=0)
    gc("k", torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match="does not match"):
        gc("k", torch.randn(4), torch.randn(4))
    gc.clear()
    gc("k", torch.randn(4), torch.randn(4))
    assert gc.stats.captured == 2


def test_graph_cache_is_eager_off_cuda():
    fn, calls = _counting_fn()
    gc = GraphCache(fn, device="cpu")
    for _ in range(3):
        gc("k", torch.randn(2), torch.randn(2))
    assert not gc.enabled and len(calls) == 3 and gc.stats.captured == 0
    assert gc.status() == "eager (3 calls, graphs off)"


def test_static_tensors_keep_their_address():
    st = StaticTensors()
    assert st.put("k", torch.randn(2, 3)) is True
    ptr = st["k"].data_ptr()
    new = torch.randn(2, 3)
    assert st.put("k", new) is False and st["k"].data_ptr() == ptr and torch.equal(st["k"], new)
    assert st.put("k", torch.randn(4)) is True  # a new shape must reallocate (graphs then re-capture)


# ------------------------------------------------------------------ the causal DiT under "capture"
def _tiny_dit(seed=0) -> WanDiT:
    torch.manual_seed(seed)
    cfg = WanConfig(text_len=8, in_dim=4, dim=32, ffn_dim=48, text_dim=8, out_dim=4, num_heads=2, num_layers=2)
    m = WanDiT(cfg).eval()
    with torch.no_grad():
        m.head.head.weight.normal_(0, 0.2)
    return m


def _cache(m, **kw):
    c = m.cfg
    return SelfKVCache(c.num_layers, c.num_heads, c.head_dim, 6, **kw)


@pytest.mark.parametrize("sink, mode", [(0, "absolute"), (1, "relative")])
def test_causal_denoiser_replay_equals_eager_rollout(sink, mode):
    """A rollout through the captured denoiser equals forward_causal block for block; graphs are
    keyed by attended length, so the ring window ends up replaying a single graph."""
    m = _tiny_dit()
    fpb, blocks, window = 2, 7, 6
    schedule = ARSchedule.build(FlowMatchTable(shift=5.0), [1000, 750, 500, 250])
    noise = torch.randn(1, fpb * blocks, 4, 4, 6)
    cross = m.prepare_cross(torch.randn(1, 5, 8))
    ref_cache = _cache(m, sink_frames=sink, window_frames=window, rope_mode=mode)
    cache = _cache(m, sink_frames=sink, window_frames=window, rope_mode=mode)
    den = CausalDenoiser(m, cache, cross)
    den.graphs = GraphCache(den._core, backend=EagerBackend(), warmup=1)
    with torch.no_grad():
        ref = ARRollout(lambda x, t, f: m.forward_causal(x, t, cross, ref_cache, f), schedule, fpb, noise,
                        seed=3).run_all()
        out = ARRollout(den, schedule, fpb, noise, seed=3).run_all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert den.graphs.stats.captured == window // fpb  # attended 2, 4, 6 frames, then 6 forever
    assert den.graphs.stats.replayed == blocks * 5 - den.graphs.stats.eager
    torch.testing.assert_close(cache.k, ref_cache.k, atol=1e-5, rtol=1e-5)


def test_prepare_captures_every_bucket_before_block_0():
    m = _tiny_dit()
    fpb, blocks, window = 2, 6, 6
    schedule = ARSchedule.build(FlowMatchTable(shift=5.0), [1000, 500])
    noise = torch.randn(1, fpb * blocks, 4, 4, 6)
    cross = m.prepare_cross(torch.randn(1, 5, 8))
    ref_cache, cache = _cache(m, window_frames=window), _cache(m, window_frames=window)
    den = CausalDenoiser(m, cache, cross)
    den.graphs = GraphCache(den._core, backend=EagerBackend(), warmup=1)
    with torch.no_grad():
        assert den.prepare(noise[:, :fpb]) == window // fpb
        assert not cache.k.any()
        eager_before = den.graphs.stats.eager
        ref = ARRollout(lambda x, t, f: m.forward_causal(x, t, cross, ref_cache, f), schedule, fpb, noise).run_all()
        out = ARRollout(den, schedule, fpb, noise).run_all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert den.graphs.stats.eager == eager_before and den.graphs.stats.captured == window // fpb


def test_causal_denoiser_prompt_switch_copies_into_static_buffers():
    m = _tiny_dit()
    cache, ref_cache = _cache(m, window_frames=4), _cache(m, window_frames=4)
    a, b = m.prepare_cross(torch.randn(1, 5, 8)), m.prepare_cross(torch.randn(1, 6, 8))
    den = CausalDenoiser(m, cache, a)
    den.graphs = GraphCache(den._core, backend=EagerBackend(), warmup=0)
    buffers = [t.data_ptr() for t in den.cross.k]
    x, t = torch.randn(1, 2, 4, 4, 6), torch.full((1, 2), 500.0)
    with torch.no_grad():
        for f, cross in ((0, a), (2, b), (4, b)):
            den.set_prompt(cross)
            got = den(x, t, f)
            want = m.forward_causal(x, t, cross, ref_cache, f)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert [t.data_ptr() for t in den.cross.k] == buffers  # copied, not rebound
    assert len(den.graphs.entries) == 2                   # attend 2 frames and 4 frames, no re-capture


# ------------------------------------------------------------------ the streaming VAE under "capture"
def test_streaming_vae_replay_equals_eager():
    torch.manual_seed(0)
    vae = WanVAE(dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), latent_mean=[0.0] * 4, latent_std=[1.0] * 4).eval()
    lat = torch.randn(1, 4, 7, 4, 6)
    ref = StreamingDecoder(vae)
    dec = StreamingDecoder(vae)
    dec.graphs = GraphCache(dec._later_chunk, backend=EagerBackend(), warmup=1)
    chunks = [(0, 1), (1, 3), (3, 5), (5, 7)]
    for s, e in chunks:
        torch.testing.assert_close(dec.decode_chunk(lat[:, :, s:e]), ref.decode_chunk(lat[:, :, s:e]),
                                   atol=1e-5, rtol=1e-5)
    assert dec.graphs.stats.captured == 1 and dec.graphs.stats.replayed == 2  # capture + 1 replay


class _OpaqueGraphBackend(EagerBackend):
    """Like torch's CUDA graphs, a captured graph keeps no Python reference to the callable it recorded."""

    def capture(self, fn, args):
        return object(), fn(*args)

    def replay(self, graph) -> None:
        pass


def test_a_dropped_stream_frees_its_graphs_without_the_cyclic_collector():
    """GraphCache holds its owner's method weakly: dropping a decoder stream (a closed session) frees its
    captured graphs at once. Before, stream -> cache -> bound method -> stream was a cycle, and on the GPU the
    graphs' pools (gigabytes per decoder chunk) stayed allocated until the cyclic collector ran."""
    import gc
    import weakref
    torch.manual_seed(0)
    vae = WanVAE(dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), latent_mean=[0.0] * 4, latent_std=[1.0] * 4).eval()
    lat = torch.randn(1, 4, 5, 4, 6)
    gc.collect()
    gc.disable()
    try:
        dec = StreamingDecoder(vae)
        dec.graphs = GraphCache(dec._later_chunk, backend=_OpaqueGraphBackend(), warmup=0)
        for s, e in [(0, 1), (1, 3), (3, 5)]:
            dec.decode_chunk(lat[:, :, s:e])
        assert dec.graphs.stats.captured == 1
        outputs = weakref.ref(next(iter(dec.graphs.entries.values())).outputs)
        alive = weakref.ref(dec)
        del dec
        assert alive() is None and outputs() is None
    finally:
        gc.enable()


def test_graph_cache_says_when_its_methods_owner_is_gone():
    class Owner:
        def run(self, x):
            return x + 1
    owner = Owner()
    cache = GraphCache(owner.run, backend=EagerBackend(), warmup=0)
    assert cache("k", torch.ones(1)).item() == 2.0
    del owner
    with pytest.raises(RuntimeError, match="was freed"):
        cache("k", torch.ones(1))
