"""TAEHV decoder parity (golden case ``taehv``) and streaming equivalence."""
import pytest
import torch
from goldens import case_json, tensors

from nodes.taehv.model import WAN21_LATENT_MEAN, WAN21_LATENT_STD, build_taehv
from nodes.taehv.stream import StreamingTAEHVDecoder

CASE = "taehv"


@pytest.fixture(scope="module")
def case():
    cj = case_json(CASE)
    sd = tensors(CASE, cj["files"]["weights"])
    model = build_taehv(sd)
    inputs = tensors(CASE, cj["files"]["inputs"])
    outputs = tensors(CASE, cj["files"]["outputs"])
    return cj, sd, model, inputs["latents"], outputs


def tol(cj, name):
    t = cj["tolerance"][name]
    return dict(atol=t["atol"], rtol=t["rtol"])


@pytest.mark.parametrize("parallel", [True, False])
def test_decode_video_matches_golden(case, parallel):
    cj, _, model, latents, outputs = case
    with torch.no_grad():
        out = model.decode_video(latents, parallel=parallel)
    assert out.shape == outputs["decode"].shape
    torch.testing.assert_close(out, outputs["decode"], **tol(cj, "decode"))


# (block latents, latents streamed, frames_to_trim); the decoder is causal, so streaming a
# prefix of the latents must give the same prefix of the full decode (keeps 1-latent blocks cheap).
@pytest.mark.parametrize("block,prefix,trim", [(3, None, None), (1, 4, None), (2, 4, 0)])
def test_exact_streaming_equals_full_decode(case, block, prefix, trim):
    cj, _, model, latents, outputs = case
    latents = latents[:, :prefix]
    stream = StreamingTAEHVDecoder(model, mode="exact", frames_to_trim=trim)
    trim = model.frames_to_trim if trim is None else trim
    state = stream.new_state()
    parts = [stream.decode(state, latents[:, t:t + block]) for t in range(0, latents.shape[1], block)]
    assert parts[0].shape[1] == min(block, latents.shape[1]) * model.t_upscale - trim
    full = outputs["decode"][:, trim:latents.shape[1] * model.t_upscale]
    torch.testing.assert_close(torch.cat(parts, 1), full, **tol(cj, "decode"))


def test_demo_streaming_matches_golden(case):
    cj, _, model, latents, outputs = case
    names = sorted((k for k in outputs if k.startswith("demo_stream_block.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    assert names, "case has no demo_stream_block.* tensors"
    # block sizes in latents, from the recorded frame counts (first block loses frames_to_trim)
    sizes = [(outputs[names[0]].shape[1] + model.frames_to_trim) // model.t_upscale]
    sizes += [outputs[n].shape[1] // model.t_upscale for n in names[1:]]
    assert sum(sizes) == latents.shape[1]
    stream = StreamingTAEHVDecoder(model, mode="demo", signed_output=True)
    state = stream.new_state()
    start = 0
    for name, size in zip(names, sizes):
        out = stream.decode(state, latents[:, start:start + size])
        start += size
        assert out.shape == outputs[name].shape, name
        torch.testing.assert_close(out, outputs[name], **tol(cj, "demo_stream_block"), msg=name)


def test_lighttae_layout_loads_and_rescales_latents(case):
    """lighttaew2_1-style dict: FlashDreams ``.blocks`` prefix, stride-2 first TGrow, no encoder."""
    cj, sd, model, latents, outputs = case
    tgrow = "decoder.7.conv.weight"
    light = {k.replace("decoder.", "decoder.blocks.", 1): v for k, v in sd.items() if k.startswith("decoder.")}
    light["decoder.blocks.7.conv.weight"] = torch.cat([torch.randn_like(sd[tgrow]), sd[tgrow]], 0)
    lm = build_taehv(light, checkpoint="lighttaew2_1")
    assert not hasattr(lm, "encoder")
    mean = torch.tensor(WAN21_LATENT_MEAN).view(1, 1, -1, 1, 1)
    std = torch.tensor(WAN21_LATENT_STD).view(1, 1, -1, 1, 1)
    raw = (latents - mean) / std  # so that the lighttae rescale gives back `latents`
    with torch.no_grad():
        out = lm.decode_video(raw)
    torch.testing.assert_close(out, outputs["decode"], **tol(cj, "decode"))


def test_encoder_sequential_equals_parallel(case):
    _, _, model, latents, _ = case
    torch.manual_seed(0)
    frames = torch.rand(1, 8, 3, 8 * latents.shape[-2], 8 * latents.shape[-1])
    with torch.no_grad():
        par = model.encode_video(frames, parallel=True)
        seq = model.encode_video(frames, parallel=False)
    assert par.shape == (1, 2, latents.shape[2], latents.shape[-2], latents.shape[-1])
    torch.testing.assert_close(seq, par, atol=1e-5, rtol=1e-5)
