"""`fd plan` for OmniDreams: the session state ar.sampler projects from ``omnidreams.dit.cache_layout()`` equals
the bytes a tiny rollout really allocates (windowed self-attention K/V per sample, a view being a sample; the
prompt's cross K/V; both twice for the guided teacher, whose unconditional branch keeps its own caches)."""
from __future__ import annotations

import pytest

import engine
from engine.memory import memory_plan


def allocated(stream) -> int:
    caches = [stream.cache] + ([stream.uncond_cache] if stream.uncond_cache is not None else [])
    cross = [stream.cross] + ([stream.cross_uncond] if stream.cross_uncond is not None else [])
    return (sum(c.k.nbytes + c.v.nbytes for c in caches)
            + sum(t.nbytes for kv in cross for pair in kv for t in pair))


@pytest.mark.parametrize("spec,extra", [
    ("tiny_omnidreams", ()),
    ("tiny_omnidreams", ("nodes.sampler.params.window_frames=null", "inputs.num_blocks=3")),
    ("tiny_omnidreams_mv", ()),
    ("tiny_omnidreams_dfar", ("nodes.sampler.params.unipc_steps=1",)),
], ids=["window", "global", "multiview", "teacher-cfg"])
def test_projected_state_equals_the_allocated_cache(spec, extra):
    pipe = engine.load(spec, overrides=list(extra))
    est = {n.node: n for n in memory_plan(pipe.plan).nodes}["sampler"]
    with pipe.load().open_session() as s:
        s.step()
        st = s.states["sampler"]
        real = allocated(st.stream) + (st.noise.nbytes if st.noise is not None else 0)
    assert est.state == real, est.state_what
    assert "KV cache" in est.state_what and est.activations > 0
