"""Model node types on tiny random weights, driven through the engine API (spec -> pipeline -> session).

The packaged ``tiny_self_forcing`` spec is shrunk further with overrides so every test
runs in about a second: these tests check wiring, shapes, state handling (prompt switch,
reset, window eviction) and checkpoint loading paths, not numerics against upstream
(``test_rollout_e2e.py`` does that).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import engine
from engine.errors import FdError
from engine.node import Step

TINY = ["inputs.num_blocks=3", "inputs.latent_height=4", "inputs.latent_width=6", "sinks.video.params.path={out}"]


def tiny(tmp_path, *extra: str) -> engine.Pipeline:
    overrides = [o.format(out=tmp_path / "v.mp4") for o in TINY] + list(extra)
    return engine.load("tiny_self_forcing", overrides=overrides).load()


def sampler_state(session):
    return session.states["sampler"]


# --------------------------------------------------------------------------- registry


def test_node_types_are_registered():
    names = set(engine.Registry.default().names())
    assert {"wan.text_encoder", "wan.dit", "ar.sampler", "wan.vae_decode", "wan.vae_encode", "taehv.decode",
            "wan.t2v_sampler", "wan.clip_encoder", "image.load"} <= names


# --------------------------------------------------------------------------- the AR pipeline


@pytest.mark.parametrize("decoder,first,later", [("taehv.decode", 9, 12), ("wan.vae_decode", 9, 12)])
def test_blocks_have_the_expected_shapes(tmp_path, decoder, first, later):
    pipe = tiny(tmp_path, f"nodes.decoder.type={decoder}")
    with pipe.open_session() as s:
        r0, r1 = s.step(), s.step()
        emb = s.values["text"]["embeds"]
    assert emb.shape == (1, 32, 32)
    assert r0.outputs["sampler"]["latent"].shape == (1, 3, 16, 4, 6)
    assert r0.outputs["decoder"]["pixels"].shape == (1, first, 3, 32, 48)
    assert r1.outputs["decoder"]["pixels"].shape == (1, later, 3, 32, 48)
    px = r1.outputs["decoder"]["pixels"]
    assert torch.isfinite(px).all() and px.min() >= -1 and px.max() <= 1


def test_prompt_switch_keeps_the_self_cache_and_swaps_the_cross_cache(tmp_path):
    pipe = tiny(tmp_path, "inputs.num_blocks=4")
    with pipe.open_session() as s:
        a = [s.step().outputs["sampler"]["latent"] for _ in range(2)]
        st = sampler_state(s)
        past = 6 * st.stream.cache.frame_tokens  # rows of the two blocks already generated
        k_before, v_before = st.stream.cache.k.clone(), st.stream.cache.v.clone()
        cross_before = [t.clone() for t in st.stream.denoiser.cross.k]
        emb_before = s.values["text"]["embeds"]
        s.step()  # same prompt: nothing re-encoded, cross K/V untouched
        assert s.values["text"]["embeds"] is emb_before and st.prompt_switches == 0
        assert all(torch.equal(x, y) for x, y in zip(st.stream.denoiser.cross.k, cross_before))
        k_three = st.stream.cache.k[:, :, :past + 3 * st.stream.cache.frame_tokens].clone()
        s.set_input("prompt", "a completely different prompt")
        b = s.step().outputs["sampler"]["latent"]
        assert st.prompt_switches == 1
        assert not torch.equal(s.values["text"]["embeds"], emb_before)
        assert not any(torch.equal(x, y) for x, y in zip(st.stream.denoiser.cross.k, cross_before))
        assert torch.equal(st.stream.cache.k[:, :, :past], k_before[:, :, :past])      # past frames kept
        assert torch.equal(st.stream.cache.v[:, :, :past], v_before[:, :, :past])
        assert torch.equal(st.stream.cache.k[:, :, :k_three.shape[2]], k_three)
        assert not torch.equal(st.stream.cache.k[:, :, k_three.shape[2]:], k_before[:, :, k_three.shape[2]:])
        s.reset()  # fresh state, the original prompt again: the same first blocks, not the switched one
        s.set_input("prompt", pipe.plan.spec.inputs["prompt"])
        same = [s.step().outputs["sampler"]["latent"] for _ in range(4)]
    torch.testing.assert_close(same[0], a[0], atol=0, rtol=0)
    torch.testing.assert_close(same[1], a[1], atol=0, rtol=0)
    assert not torch.allclose(same[3], b)


def test_reset_gives_identical_output_and_the_seed_matters(tmp_path):
    pipe = tiny(tmp_path)
    with pipe.open_session() as s:
        first = [s.step().outputs["decoder"]["pixels"] for _ in range(2)]
        s.reset()
        again = [s.step().outputs["decoder"]["pixels"] for _ in range(2)]
        s.reset()
        s.set_input("seed", 7)
        other = s.step().outputs["sampler"]["latent"]
        s.reset()
        s.set_input("seed", 0)
        lat0 = s.step().outputs["sampler"]["latent"]
    for x, y in zip(first, again):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert not torch.allclose(other, lat0)


@pytest.mark.parametrize("rope_mode", ["absolute", "relative"])
def test_window_eviction_runs_past_the_window(tmp_path, rope_mode):
    pipe = tiny(tmp_path, "nodes.sampler.params.sink_frames=3", "nodes.sampler.params.window_frames=9",
                f"nodes.sampler.params.rope_mode={rope_mode}", "nodes.decoder.type=taehv.decode")
    with pipe.open_session() as s:
        for _ in range(6):  # 18 frames through a 9-frame window
            r = s.step()
            st = sampler_state(s)
            assert st.noise is None  # unbounded: noise drawn per block
            assert st.stream.cache.k.shape[2] == 9 * st.stream.cache.frame_tokens
            sink = st.stream.cache.k[:, :, :3 * st.stream.cache.frame_tokens].clone() if r.block == 0 else sink
        assert torch.isfinite(r.outputs["sampler"]["latent"]).all()
        if rope_mode == "absolute":  # the sink rows are written once, by block 0
            assert torch.equal(st.stream.cache.k[:, :, :3 * st.stream.cache.frame_tokens], sink)


def test_breakdown_separates_dit_steps_from_the_kv_pass(tmp_path):
    pipe = tiny(tmp_path)
    node = pipe.nodes["sampler"]
    with pipe.open_session() as s:
        s.step()
        b = node.last_breakdown_ms()
        assert set(b) == {"dit_ms", "kv_ms"} and b["dit_ms"] > 0 and b["kv_ms"] > 0
        assert len(sampler_state(s).timers["dit_ms"]) == 4 and len(sampler_state(s).timers["kv_ms"]) == 1
    assert node.graph_status().startswith("eager")


def test_i2v_image_pass_then_blocks(tmp_path):
    pipe = tiny(tmp_path, "nodes.sampler.params.frames_per_block=1", "inputs.num_blocks=3")
    node = pipe.nodes["sampler"]
    handle = pipe.nodes["dit"].handle
    text = pipe.nodes["text"].encode("a cat")
    image = torch.randn(1, 1, 16, 4, 6)
    state = node.new_state()
    inputs = {"model": handle, "text": text, "image_latent": image}
    outs = [node.run(inputs, state, Step(b, {}))["latent"] for b in range(3)]
    assert outs[0].shape == (1, 2, 16, 4, 6) and outs[1].shape == (1, 1, 16, 4, 6)
    torch.testing.assert_close(outs[0][:, :1], image, atol=0, rtol=0)
    assert set(node.last_breakdown_ms()) == {"dit_ms", "kv_ms"}
    assert state.rollout.first_frame == 1


def test_past_num_blocks_says_how_to_fix(tmp_path):
    pipe = tiny(tmp_path, "inputs.num_blocks=1")
    with pipe.open_session() as s:
        s.step()
        with pytest.raises(FdError, match="window_frames"):
            s.step()


def test_context_parallel_without_a_group_is_a_clear_error(tmp_path):
    """A DiT can only be handed a group the pipeline made: asking for context 2 in a 1-process run is
    refused when the spec is planned, naming the node's parallel field."""
    from engine import SpecErrors
    with pytest.raises(SpecErrors) as e:
        tiny(tmp_path, "nodes.dit.parallel.context=2")
    assert any(x.node == "dit" and "parallel" in (x.field or "") for x in e.value.errors)


# --------------------------------------------------------------------------- checkpoints


def _tiny_dit_sd(seed=0, **kw):
    from nodes.wan.config import WanConfig
    from nodes.wan.dit import WanDiT
    torch.manual_seed(seed)
    cfg = WanConfig(**{**dict(text_len=8, in_dim=4, dim=32, ffn_dim=48, text_dim=8, out_dim=4, num_heads=2,
                              num_layers=2), **kw})
    return {k: v.clone() for k, v in WanDiT(cfg).state_dict().items()}


@pytest.mark.parametrize("layout", ["native", "self_forcing_ema", "self_forcing_generator", "fsdp", "diffusers"])
def test_dit_node_loads_every_checkpoint_layout(tmp_path, layout):
    from nodes.checkpoint.keymaps import apply
    from nodes.checkpoint.wan_layouts import DIT_NATIVE_TO_DIFFUSERS
    from nodes.wan.node_dit import WanDiTNode
    ema, gen = _tiny_dit_sd(0), _tiny_dit_sd(1)
    if layout == "native":
        path, want, params = tmp_path / "dit.safetensors", ema, {}
        save_file(ema, path)
    elif layout == "diffusers":
        path, want, params = tmp_path / "dit.safetensors", ema, {}
        save_file(dict(apply(DIT_NATIVE_TO_DIFFUSERS, ema)), path)
    else:
        prefix = "model._fsdp_wrapped_module." if layout == "fsdp" else "model."
        path = tmp_path / "train.pt"
        torch.save({"generator": {prefix + k: v for k, v in gen.items()},
                    "generator_ema": {prefix + k: v for k, v in ema.items()}, "step": torch.tensor(3)}, path)
        use_ema = layout != "self_forcing_generator"
        want, params = (ema if use_ema else gen), {"ema": use_ema}
    node = WanDiTNode("dit", {"checkpoint": str(path), "num_heads": 2, "text_len": 8, "dtype": "fp32", **params},
                      "cpu")
    node.load()
    got = node.handle.module.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert node.handle.config.num_heads == 2 and node.handle.config.dim == 32


def test_dit_estimate_bytes_from_preset_without_building():
    from nodes.wan.node_dit import WanDiTNode
    small = WanDiTNode("a", {"preset": "1.3b", "dtype": "bf16"}, "cpu").estimate_bytes()
    big = WanDiTNode("b", {"preset": "14b", "dtype": "bf16"}, "cpu").estimate_bytes()
    assert 2.5e9 < small < 3.5e9 and 25e9 < big < 35e9  # ~1.4B and ~14B parameters, 2 bytes each


def test_text_encoder_bytes_tokenizer_cache_and_checkpoint(tmp_path):
    from nodes.text.node import TextEncoderNode, byte_tokenize
    ids, mask = byte_tokenize(["ab"], 6)
    assert ids.tolist() == [[ord("a") + 3, ord("b") + 3, 1, 0, 0, 0]] and mask.sum() == 3
    params = {"checkpoint": "random", "tokenizer": "bytes", "text_len": 12, "dim": 16, "ffn_dim": 32,
              "num_heads": 2, "head_dim": 8, "num_layers": 1, "vocab_size": 300, "dtype": "fp32"}
    node = TextEncoderNode("t", params, "cpu")
    node.load()
    out = node.run({"prompt": "hello", "negative": "bad"}, None, Step(None, {}))
    e, n = out["embeds"], out["negative_embeds"]
    assert e.shape == (1, 12, 16) and e[0, 6:].abs().sum() == 0 and e[0, :6].abs().sum() > 0
    assert node.encode("hello") is e and not torch.equal(e, n)
    # the same weights saved as an HF-layout safetensors file load back to the same embeddings
    sd = {k: v.contiguous() for k, v in node.model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(sd, tmp_path / "t5.safetensors")
    loaded = TextEncoderNode("t2", {**params, "checkpoint": str(tmp_path / "t5.safetensors")}, "cpu")
    loaded.load()
    torch.testing.assert_close(loaded.encode("hello"), e, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- decoders / encoders


def _vae_node(cls, **params):
    node = cls("vae", {"checkpoint": "random", "dim": 8, "dtype": "fp32", **params}, "cpu")
    node.load()
    return node


def test_vae_decode_stream_equals_the_full_decode():
    from nodes.wan.node_vae import WanVAEDecodeNode
    node = _vae_node(WanVAEDecodeNode)
    z = torch.randn(1, 5, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    state = node.new_state()
    parts = [node.run({"latent": z[:, s:e]}, state, Step(i, {}))["pixels"]
             for i, (s, e) in enumerate([(0, 2), (2, 3), (3, 5)])]
    assert [p.shape[1] for p in parts] == [5, 4, 8]
    full = node.vae.decode(z.transpose(1, 2).contiguous(), clamp=True).transpose(1, 2)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_vae_decode_in_chunks_equals_the_whole_block(monkeypatch):
    """``chunk``: a block's latents through the decoder a few frames per call give the one-call frames, in the
    exact and the demo mode (whose first-block trim applies to the joined frames). In exact mode the clip's first
    latent frame goes alone, so a clip of 1 + k*chunk latents makes every later call the same shape."""
    from nodes.wan.node_vae import WanVAEDecodeNode
    from nodes.wan.vae_stream import StreamingDecoder
    calls = []
    real = StreamingDecoder.decode_chunk
    monkeypatch.setattr(StreamingDecoder, "decode_chunk", lambda self, z: calls.append(z.shape[2]) or real(self, z))
    z = torch.randn(1, 9, 16, 4, 6, generator=torch.Generator().manual_seed(1))
    blocks = [(0, 7), (7, 9)]
    expected = {"exact": [[7], [1, 3, 3], [2], [2]],       # whole, chunked per block: 7 = 1 + 3 + 3, then 2 < 3
                "demo": [[7], [3, 3, 1], [2], [2]]}        # demo streams have no first-frame decode
    for mode in ("exact", "demo"):
        whole, chunked = _vae_node(WanVAEDecodeNode, mode=mode), _vae_node(WanVAEDecodeNode, mode=mode, chunk=3)
        chunked.vae.load_state_dict(whole.vae.state_dict())
        states = whole.new_state(), chunked.new_state()
        seen = []
        for i, (a, b) in enumerate(blocks):
            calls.clear()
            want = whole.run({"latent": z[:, a:b]}, states[0], Step(i, {}))["pixels"]
            seen.append(list(calls))
            calls.clear()
            got = chunked.run({"latent": z[:, a:b]}, states[1], Step(i, {}))["pixels"]
            seen.append(list(calls))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert seen == expected[mode]


def test_decoder_chunk_sizes_cover_the_block():
    from nodes.wan.vae_stream import StreamingDecoder
    dec = StreamingDecoder.__new__(StreamingDecoder)
    for first in (True, False):
        dec.first = first
        for frames in range(1, 23):
            for size in range(0, 6):
                sizes = dec.chunk_sizes(frames, size)
                assert sum(sizes) == frames and all(0 < n for n in sizes)
                assert sizes[0] == 1 if first and size else True
                assert all(n <= size for n in sizes) if size else sizes == [frames]
    dec.first = True
    assert dec.chunk_sizes(21, 4) == [1, 4, 4, 4, 4, 4]    # W2's clip: one shape after the first frame


def test_vae_decode_loads_a_native_checkpoint(tmp_path):
    from nodes.wan.node_vae import WanVAEDecodeNode
    src = _vae_node(WanVAEDecodeNode)
    torch.save({k: v.contiguous() for k, v in src.vae.state_dict().items()}, tmp_path / "vae.pth")
    node = WanVAEDecodeNode("vae", {"checkpoint": str(tmp_path / "vae.pth"), "dtype": "fp32"}, "cpu")
    node.load()
    assert node.vae.decoder.conv1.weight.shape == src.vae.decoder.conv1.weight.shape  # dim read from the file
    z = torch.randn(1, 2, 16, 4, 6)
    a = node.run({"latent": z}, node.new_state(), Step(0, {}))["pixels"]
    b = src.run({"latent": z}, src.new_state(), Step(0, {}))["pixels"]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_vae_encode_image_and_i2v_condition():
    from nodes.wan.node_vae import WanVAEEncodeNode
    img = torch.rand(1, 3, 32, 48) * 2 - 1
    z = _vae_node(WanVAEEncodeNode).run({"image": img}, None, Step(None, {}))["latent"]
    assert z.shape == (1, 1, 16, 4, 6)
    y = _vae_node(WanVAEEncodeNode, mode="i2v_condition", frames=9).run({"image": img}, None, Step(None, {}))["latent"]
    assert y.shape == (1, 3, 20, 4, 6)
    assert torch.equal(y[:, 0, :4], torch.ones_like(y[:, 0, :4])) and y[:, 1:, :4].abs().sum() == 0
    torch.testing.assert_close(y[:, :1, 4:], z, atol=1e-5, rtol=1e-5)  # frame 0 is the image alone (causal)


def test_taehv_decode_streams_with_the_first_block_trimmed():
    from nodes.taehv.node import TAEHVDecodeNode
    node = TAEHVDecodeNode("t", {"checkpoint": "random", "channels": [16, 8, 8, 8], "dtype": "fp32"}, "cpu")
    node.load()
    z = torch.randn(1, 6, 16, 4, 6)
    state = node.new_state()
    a = node.run({"latent": z[:, :3]}, state, Step(0, {}))["pixels"]
    b = node.run({"latent": z[:, 3:]}, state, Step(1, {}))["pixels"]
    assert a.shape == (1, 9, 3, 32, 48) and b.shape == (1, 12, 3, 32, 48)
    full = node.stream.model.decode_video(z)[:, 3:] * 2 - 1
    torch.testing.assert_close(torch.cat([a, b], 1), full.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def _write_png(path, rgb: np.ndarray) -> None:
    import av
    with av.open(str(path), "w", format="image2") as c:
        s = c.add_stream("png", rate=1)
        s.width, s.height, s.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_image_load_reads_png_and_clip_encodes(tmp_path):
    from nodes.image.node import ClipEncoderNode, ImageLoadNode
    rgb = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    _write_png(tmp_path / "x.png", rgb)
    same = ImageLoadNode("i", {"path": str(tmp_path / "x.png"), "height": 16, "width": 24}, "cpu")
    img = same.run({}, None, Step(None, {}))["image"]
    torch.testing.assert_close(img, torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1)
    small = ImageLoadNode("i", {"path": str(tmp_path / "x.png"), "height": 8, "width": 12}, "cpu")
    assert small.run({}, None, Step(None, {}))["image"].shape == (1, 3, 8, 12)
    with pytest.raises(FdError, match="no such file"):
        ImageLoadNode("i", {"path": str(tmp_path / "nope.png")}, "cpu").run({}, None, Step(None, {}))
    clip = ClipEncoderNode("c", {"checkpoint": "random", "hidden": 32, "layers": 2, "mlp": 16, "num_heads": 2,
                                 "patch": 4, "image_size": 16, "dtype": "fp32"}, "cpu")
    clip.load()
    assert clip.run({"image": img}, None, Step(None, {}))["tokens"].shape == (1, 17, 32)


# --------------------------------------------------------------------------- bidirectional Wan


def _t2v(handle, text, params, **inputs):
    from nodes.wan.node_t2v import WanT2VSamplerNode
    node = WanT2VSamplerNode("s", {"num_steps": 3, "frames": 5, "latent_height": 4, "latent_width": 6, **params},
                             "cpu")
    return node.run({"model": handle, "text": text, **inputs}, None, Step(0, {}))["latent"]


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_t2v_sampler_cfg_and_seed(solver):
    from nodes.wan.node_dit import WanDiTNode
    dit = WanDiTNode("dit", {"checkpoint": "random", "dim": 32, "ffn_dim": 48, "num_heads": 2, "num_layers": 1,
                             "text_dim": 8, "text_len": 6, "dtype": "fp32"}, "cpu")
    dit.load()
    text, neg = torch.randn(1, 6, 8), torch.randn(1, 4, 8)
    p = {"solver": solver}
    out = _t2v(dit.handle, text, p, negative=neg)
    assert out.shape == (1, 2, 16, 4, 6) and torch.isfinite(out).all()
    torch.testing.assert_close(out, _t2v(dit.handle, text, p, negative=neg), atol=0, rtol=0)
    no_cfg = _t2v(dit.handle, text, p)
    torch.testing.assert_close(_t2v(dit.handle, text, {**p, "guide_scale": 1.0}, negative=neg), no_cfg,
                               atol=0, rtol=0)
    assert not torch.allclose(out, no_cfg)
    assert not torch.allclose(_t2v(dit.handle, text, p, seed=3), no_cfg)


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_t2v_sampler_batched_cfg_equals_two_passes(model_type):
    """cfg: batched stacks both prompts into one batch-2 forward: the same latents as two forwards."""
    from nodes.wan.node_dit import WanDiTNode
    dit = WanDiTNode("dit", {"checkpoint": "random", "dim": 32, "ffn_dim": 48, "num_heads": 2, "num_layers": 1,
                             "text_dim": 8, "text_len": 6, "dtype": "fp32", "model_type": model_type}, "cpu")
    dit.load()
    text, neg = torch.randn(1, 6, 8), torch.randn(1, 4, 8)
    extra = {}
    if model_type == "i2v":
        extra = {"clip": torch.randn(1, 257, 1280), "y": torch.randn(1, 2, 20, 4, 6)}
    two = _t2v(dit.handle, text, {}, negative=neg, **extra)
    one = _t2v(dit.handle, text, {"cfg": "batched"}, negative=neg, **extra)
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(two, _t2v(dit.handle, text, {"cfg": "batched"}, **extra))   # no negative: no CFG


def test_t2v_sampler_i2v_inputs():
    from nodes.wan.node_dit import WanDiTNode
    dit = WanDiTNode("dit", {"checkpoint": "random", "model_type": "i2v", "dim": 32, "ffn_dim": 48, "num_heads": 2,
                             "num_layers": 1, "text_dim": 8, "text_len": 6, "dtype": "fp32"}, "cpu")
    dit.load()
    assert dit.handle.config.in_dim == 36
    clip, y = torch.randn(1, 5, 1280), torch.randn(1, 2, 20, 4, 6)
    out = _t2v(dit.handle, torch.randn(1, 6, 8), {}, clip=clip, y=y)
    assert out.shape == (1, 2, 16, 4, 6) and torch.isfinite(out).all()
    with pytest.raises(FdError, match="i2v"):
        _t2v(dit.handle, torch.randn(1, 6, 8), {})


# --------------------------------------------------------------------------- whole tiny graphs


def test_tiny_causal_i2v_graph_runs(tmp_path):
    """causal_forcing_i2v's wiring (image -> VAE encode -> image pass -> framewise blocks) on tiny weights."""
    _write_png(tmp_path / "x.png", np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    (tmp_path / "i2v.yaml").write_text(f"""
extends: tiny_self_forcing
inputs: {{image: {tmp_path / "x.png"}, num_blocks: 2, latent_height: 4, latent_width: 6}}
nodes:
  image:
    type: image.load
    params: {{path: "${{inputs.image}}", height: 32, width: 48}}
    device: cpu
  image_latent:
    type: wan.vae_encode
    in: {{image: image.image}}
    params: {{checkpoint: random, dim: 8, mode: image, dtype: fp32}}
    device: cpu
  sampler:
    in: {{image_latent: image_latent.latent}}
    params: {{frames_per_block: 1}}
sinks:
  video: {{params: {{path: {tmp_path / "i2v.mp4"}}}}}
""")
    pipe = engine.load(str(tmp_path / "i2v.yaml")).load()
    with pipe.open_session() as s:
        r0, r1 = s.step(), s.step()
        image_latent = s.values["image_latent"]["latent"]
    assert image_latent.shape == (1, 1, 16, 4, 6)
    lat0 = r0.outputs["sampler"]["latent"]
    assert lat0.shape == (1, 2, 16, 4, 6) and torch.equal(lat0[:, :1], image_latent)
    assert r0.outputs["decoder"]["pixels"].shape[1] == 5 and r1.outputs["decoder"]["pixels"].shape[1] == 4
    assert (tmp_path / "i2v.mp4").is_file()


def test_tiny_bidirectional_t2v_graph_runs(tmp_path):
    """wan21_t2v_1.3b's wiring (prompt + negative -> one-block clip -> streaming decode) on tiny weights."""
    (tmp_path / "t2v.yaml").write_text(f"""
inputs: {{prompt: "a cat", negative_prompt: "blurry", seed: 0, num_blocks: 1}}
nodes:
  text:
    type: wan.text_encoder
    in: {{prompt: inputs.prompt, negative: inputs.negative_prompt}}
    params: {{checkpoint: random, tokenizer: bytes, text_len: 8, dim: 8, ffn_dim: 8, num_heads: 1, head_dim: 8,
             num_layers: 1, vocab_size: 260}}
  dit:
    type: wan.dit
    params: {{checkpoint: random, dim: 32, ffn_dim: 32, num_heads: 2, num_layers: 1, text_dim: 8, text_len: 8}}
  sampler:
    type: wan.t2v_sampler
    in: {{model: dit.model, text: text.embeds, negative: text.negative_embeds, seed: inputs.seed}}
    params: {{num_steps: 2, frames: 9, latent_height: 4, latent_width: 6}}
  decoder:
    type: taehv.decode
    in: {{latent: sampler.latent}}
    params: {{checkpoint: random, channels: [16, 8, 8, 8]}}
sinks:
  video:
    type: sink.mp4
    in: {{frames: decoder.pixels}}
    params: {{path: {tmp_path / "t2v.mp4"}}}
""")
    pipe = engine.load(str(tmp_path / "t2v.yaml")).load()
    with pipe.open_session() as s:
        r = s.step()
        with pytest.raises(FdError, match="whole clip"):
            s.step()
    assert r.outputs["sampler"]["latent"].shape == (1, 3, 16, 4, 6)
    assert r.outputs["decoder"]["pixels"].shape == (1, 9, 3, 32, 48)


def test_vae_decode_sessions_share_one_set_of_pointwise_kernels():
    """Every session's stream uses the node's one FusedOps: on CUDA its torch.compile'd glue is traced once per
    model, not once per session (a fresh wrapper per stream re-traced and re-compiled on every new session)."""
    from nodes.wan.node_vae import WanVAEDecodeNode
    node = _vae_node(WanVAEDecodeNode)
    z = torch.randn(1, 2, 16, 4, 6)
    states = [node.new_state(), node.new_state()]
    outs = [node.run({"latent": z}, s, Step(0, {}))["pixels"] for s in states]
    assert states[0]["decoder"] is not states[1]["decoder"]                # separate caches per session
    assert states[0]["decoder"].fused is states[1]["decoder"].fused is not None
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
