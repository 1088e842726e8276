"""A finished or reset session hands its KV cache (and on CUDA its captured graphs) to the next session."""
import torch

import engine


def test_next_session_reuses_cache_and_reproduces_output(tmp_path):
    pipe = engine.load("tiny_self_forcing", overrides=[f"sinks.video.params.path={tmp_path / 'v.mp4'}",
                                                       "inputs.num_blocks=2"])
    pipe.load()
    sampler = pipe.nodes["sampler"]
    with pipe.open_session() as s1:
        a = [s1.step().outputs["sampler"]["latent"].clone() for _ in range(2)]
        cache1 = s1.states["sampler"].stream.cache.k
    with pipe.open_session() as s2:
        b = [s2.step().outputs["sampler"]["latent"].clone() for _ in range(2)]
        assert s2.states["sampler"].stream.cache.k.data_ptr() == cache1.data_ptr()   # recycled, not reallocated
        s2.reset()
        c = [s2.step().outputs["sampler"]["latent"].clone() for _ in range(2)]
        assert s2.states["sampler"].stream.cache.k.data_ptr() == cache1.data_ptr()
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(y, x, rtol=0, atol=0)
        torch.testing.assert_close(z, x, rtol=0, atol=0)
    assert sampler._spare is not None
