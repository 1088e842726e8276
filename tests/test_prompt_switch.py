"""`ar.sampler.prompt_switch`: keep (the cache stays), recache (context passes again with the new prompt), reset.

The recache reference is computed here by hand through the causal-model contract: a fresh stream of the
same DiT, the new prompt's embeddings, the committed latents of the earlier blocks passed again at t = 0,
then the next block's few-step denoise with the sampler's noise and RNG state. None of the sampler's
recache code runs in it.
"""
import pytest
import torch

import engine
from nodes.ar.rollout import ARRollout
from nodes.ar.switch import ContextRecord, retained
from nodes.common.causal import StreamSpec

P1, P2 = "a red fox in the snow", "a lighthouse in a storm"


def _pipe(tmp_path, mode, *extra):
    return engine.load("tiny_self_forcing", overrides=[
        f"sinks.video.params.path={tmp_path / 'v.mp4'}", "inputs.num_blocks=4",
        f"nodes.sampler.params.prompt_switch={mode}", *extra]).load()


def _latent(result):
    return result.outputs["sampler"]["latent"].clone()


def _switch_run(pipe, switch_at=2, blocks=3):
    with pipe.open_session(prompt=P1) as s:
        lat = [_latent(s.step()) for _ in range(switch_at)]
        st = s.states["sampler"]
        rng, noise = st.generator.get_state(), st.noise.clone()
        s.set_input("prompt", P2)
        after = [_latent(s.step()) for _ in range(blocks - switch_at)]
        return lat, after, rng, noise, s.values["dit"]["model"], s.values["text"]["embeds"], pipe.nodes["sampler"]


def test_recache_equals_context_passes_with_the_new_prompt(tmp_path):
    lat, after, rng, noise, model, emb2, sampler = _switch_run(_pipe(tmp_path, "recache"))
    p = sampler.p
    ref = model.open_stream(StreamSpec(frame_shape=(p.latent_channels, p.latent_height, p.latent_width),
                                       frames_per_block=3, batch=1, max_frames=p.num_blocks * 3))
    ref.set_conditions(text=emb2)
    with torch.no_grad():
        for b, x0 in enumerate(lat):
            ref.commit(x0, 0.0, 3 * b)
    g = torch.Generator().manual_seed(0)
    g.set_state(rng)
    roll = ARRollout(ref, sampler._schedule(), 3, generator=g)
    roll.block_index = len(lat)
    with torch.no_grad():
        want = roll.step(noise[:, 3 * len(lat):3 * len(lat) + 3])
    torch.testing.assert_close(after[0], want, rtol=0, atol=0)
    # and it is not what `keep` gives: the old prompt's K/V really were replaced
    _, kept, *_ = _switch_run(_pipe(tmp_path, "keep"))
    assert not torch.allclose(kept[0], after[0])


def test_reset_starts_over_like_a_new_session(tmp_path):
    pipe = _pipe(tmp_path, "reset")
    with pipe.open_session(prompt=P1) as s:
        s.step()
        s.step()
        s.set_input("prompt", P2)
        got = [s.step() for _ in range(2)]
        assert s.states["sampler"].prompt_switches == 1
    with pipe.open_session(prompt=P2) as fresh:
        want = [_latent(fresh.step()) for _ in range(2)]
    for r, w in zip(got, want):
        torch.testing.assert_close(_latent(r), w, rtol=0, atol=0)
    assert got[0].outputs["decoder"]["pixels"].shape[1] == 12     # the decoder went on (no first-block trim)


def test_recache_history_survives_a_snapshot(tmp_path):
    pipe = _pipe(tmp_path, "recache")
    with pipe.open_session(prompt=P1) as s:
        s.step()
        s.step()
        snap = s.snapshot()
        s.set_input("prompt", P2)
        want = _latent(s.step())
    with pipe.open_session() as s2:
        s2.restore(snap)
        assert len(s2.states["sampler"].restore["history"]) == 2
        s2.set_input("prompt", P2)            # a switch straight after the restore
        torch.testing.assert_close(_latent(s2.step()), want, rtol=0, atol=0)
    with pipe.open_session() as s3:
        s3.restore(snap, prompt=P2)           # restored under a new prompt: the same switch
        torch.testing.assert_close(_latent(s3.step()), want, rtol=0, atol=0)
        assert s3.states["sampler"].prompt_switches == 1


def test_retained_keeps_sink_and_window():
    recs = [ContextRecord(torch.zeros(1, 3, 1, 1, 1), 0.0, f) for f in range(0, 18, 3)]
    assert [r.frame_start for r in retained(recs, sink_frames=3, window_frames=9)] == [0, 12, 15]
    assert [r.frame_start for r in retained(recs, sink_frames=0, window_frames=7)] == [9, 12, 15]
    assert retained(recs, 0, None) == recs


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(engine.errors.SpecErrors, match="prompt_switch"):
        _pipe(tmp_path, "rewind")
