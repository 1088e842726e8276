"""`fd plan` for Wan 2.2's two experts: the sampler's projected session state counts both experts' KV caches
and their two copies of the prompt's cross K/V, to the byte of what a tiny rollout allocates."""
from __future__ import annotations

import pytest

import engine
from engine.memory import memory_plan


@pytest.mark.parametrize("extra", [(), ("nodes.experts.params.cross_attention=per_expert",
                                        "nodes.sampler.params.window_frames=6")], ids=["shared_high", "per_expert"])
def test_projected_state_counts_both_experts(extra):
    pipe = engine.load("causal_wan22", overrides=list(extra))
    experts = [n for n, np_ in pipe.plan.nodes.items() if np_.type_name == "wan22.experts"]
    assert experts, "causal_wan22 has a wan22.experts node"
    est = {n.node: n for n in memory_plan(pipe.plan).nodes}["sampler"]
    with pipe.load().open_session() as s:
        s.step()
        st = s.states["sampler"]
        real = st.noise.nbytes if st.noise is not None else 0
        assert len(st.stream.streams) == 2
        for stream in st.stream.streams:
            cache = stream.cache
            real += sum(t.nbytes for t in (cache.k, cache.v, cache.sink_k) if t is not None)
            real += sum(t.nbytes for t in stream.denoiser.static.buffers.values())
    assert est.state == real, est.state_what
