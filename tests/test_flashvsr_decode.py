"""FlashVSR TCDecoder + colour correction parity (golden case ``flashvsr_tcdecoder``), and the
``flashvsr.decode`` node: streaming per chunk, empty blocks, frame-count checks, snapshots.

Every size (widths, latent grid, chunk ranges, frame counts) comes from the case files."""
import pytest
import torch
from goldens import case_json, tensors
from safetensors.torch import save_file

from engine.errors import FdError
from engine.node import Step
from nodes.flashvsr.color import color_correct, wavelet_split
from nodes.flashvsr.node_decode import FlashVSRDecodeNode
from nodes.flashvsr.tcdecoder import TCDecoderConfig, build_tcdecoder
from nodes.taehv.stream import StreamingTAEHVDecoder

CASE = "flashvsr_tcdecoder"


@pytest.fixture(scope="module")
def case():
    torch.backends.mkldnn.enabled = False     # the golden's own setting (reproducible native convs)
    cj = case_json(CASE)
    sd = tensors(CASE, cj["files"]["weights"])
    inputs = tensors(CASE, cj["files"]["inputs"])
    outputs = tensors(CASE, cj["files"]["outputs"])
    latents = inputs["latents"].transpose(1, 2)                                   # [1, T, 16, h, w]
    lq = inputs["lq_video_u8"].to(torch.float32).permute(0, 3, 1, 2)[None] / 255.0 * 2.0 - 1.0  # [1, F, 3, H, W]
    return cj, sd, latents, lq, outputs


def tol(cj, name):
    t = cj["tolerance"][name]
    return dict(atol=t["atol"], rtol=t["rtol"])


def ref(outputs, key):
    return outputs[key].transpose(1, 2)       # golden [1, 3, F, H, W] -> [1, F, 3, H, W]


def chunks(cj):
    return [(tuple(c["latents"]), tuple(c["lq_frames"])) for c in cj["config"]["chunks"]]


def test_config_read_from_weights(case):
    cj, sd, latents, _, _ = case
    cfg = TCDecoderConfig.from_state_dict(sd, latent_channels=latents.shape[2])
    assert list(cfg.channels) == cj["config"]["channels"]
    assert cfg.in_channels == cj["config"]["latent_channels"]
    model = build_tcdecoder(sd, latent_channels=latents.shape[2])
    assert len(model.decoder) == cj["config"]["n_decoder_layers"]
    assert model.frames_to_trim == cj["config"]["frames_to_trim"]
    assert list(model.cond_factors) == cj["config"]["cond_pixel_shuffle"][:2]


def _stream(case, fused=False):
    cj, sd, latents, lq, _ = case
    model = build_tcdecoder(sd, latent_channels=latents.shape[2])
    dec = StreamingTAEHVDecoder(model, mode="exact", signed_output=True, fused=fused)
    state = dec.new_state()
    for (a, b), (p, q) in chunks(cj):
        yield dec.decode(state, model.decoder_input(latents[:, a:b], lq[:, p:q])), lq[:, p:q]


def test_streaming_chunks_match_golden(case):
    cj, _, _, _, outputs = case
    for k, (frames, lq_chunk) in enumerate(_stream(case)):
        torch.testing.assert_close(frames, ref(outputs, f"stream.{k}.frames"), **tol(cj, "frames"))
        for method in ("adain", "wavelet"):
            key = f"stream.{k}.{method}"
            if key in outputs:
                torch.testing.assert_close(color_correct(frames, lq_chunk, method), ref(outputs, key),
                                           **tol(cj, "colour_corrected"))
    assert any(k.endswith(".wavelet") for k in outputs) and any(k.endswith(".adain") for k in outputs)


def test_fused_upsample_close_to_golden(case):
    cj, _, _, _, outputs = case
    for k, (frames, _) in enumerate(_stream(case, fused=True)):
        torch.testing.assert_close(frames, ref(outputs, f"stream.{k}.frames"), atol=1e-4, rtol=1e-4)


def test_one_decode_equals_concatenated_stream(case):
    """Upstream v1 decodes everything once at the end (cond = LQ frames [0, last chunk's end))."""
    cj, sd, latents, lq, outputs = case
    model = build_tcdecoder(sd, latent_channels=latents.shape[2])
    dec = StreamingTAEHVDecoder(model, mode="exact", signed_output=True)
    end = chunks(cj)[-1][1][1]
    full = dec.decode(dec.new_state(), model.decoder_input(latents, lq[:, :end]))
    stream = torch.cat([ref(outputs, f"stream.{k}.frames") for k in range(len(chunks(cj)))], 1)
    torch.testing.assert_close(full, stream, **tol(cj, "frames"))


def test_cond_unshuffle_matches_an_index_loop(case):
    """Channel (c, dt, dy, dx) of latent cell (t, y, x) = frame ft*t + dt - pad, pixel (fs*y + dy, fs*x + dx)."""
    _, sd, latents, lq, _ = case
    model = build_tcdecoder(sd, latent_channels=latents.shape[2])
    ft, fs = model.cond_factors
    cond = lq[:, : 2 * ft - 1]                         # one frame short: one copy of frame 0 in front
    out = model.unshuffle_cond(cond)
    padded = torch.cat([cond[:, :1], cond], 1)
    n_t, n_c, h, w = out.shape[1], cond.shape[2], out.shape[3], out.shape[4]
    for t in range(n_t):
        for c in range(n_c):
            for dt in range(ft):
                for dy in (0, fs - 1):
                    for dx in (0, fs // 2):
                        ch = ((c * ft + dt) * fs + dy) * fs + dx
                        want = padded[0, ft * t + dt, c, dy::fs, dx::fs][:h, :w]
                        assert torch.equal(out[0, t, ch], want)


def test_wavelet_split_is_lossless():
    x = torch.randn(3, 3, 20, 28, dtype=torch.float64)
    high, low = wavelet_split(x)
    torch.testing.assert_close(high + low, x)


def test_adain_is_per_frame(case):
    """Upstream v1 corrects 16 frames at a time, v1.1 per chunk: the same numbers either way."""
    _, _, _, lq, _ = case
    n = lq.shape[1]
    hq = torch.randn_like(lq)
    whole = color_correct(hq, lq, "adain")
    parts = torch.cat([color_correct(hq[:, a:a + 5], lq[:, a:a + 5], "adain") for a in range(0, n, 5)], 1)
    torch.testing.assert_close(whole, parts)


# ---------------------------------------------------------------------------- the node
@pytest.fixture(scope="module")
def checkpoint(case, tmp_path_factory):
    _, sd, _, _, _ = case
    path = tmp_path_factory.mktemp("tcdecoder") / "TCDecoder.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


def _node(checkpoint, latent_channels, **params):
    node = FlashVSRDecodeNode("decode", {"checkpoint": checkpoint, "dtype": "fp32", "fused": False,
                                         "latent_channels": latent_channels, **params})
    node.load()
    return node


@pytest.mark.parametrize("method", ["adain", "wavelet", "none"])
def test_node_streams_chunks_with_colour_fix(case, checkpoint, method):
    cj, _, latents, lq, outputs = case
    node = _node(checkpoint, latents.shape[2], color_fix=method)
    state = node.new_state()
    for k, ((a, b), (p, q)) in enumerate(chunks(cj)):
        out = node.run({"latent": latents[:, a:b], "cond": lq[:, p:q]}, state, Step(block=k, inputs={}))["pixels"]
        key = f"stream.{k}.{'frames' if method == 'none' else method}"
        if key in outputs:
            torch.testing.assert_close(out, ref(outputs, key),
                                       **tol(cj, "frames" if method == "none" else "colour_corrected"))
    assert state.frames_out == sum(q - p for _, (p, q) in chunks(cj))


def test_node_empty_block_and_frame_count_check(case, checkpoint):
    cj, _, latents, lq, outputs = case
    node = _node(checkpoint, latents.shape[2])
    state = node.new_state()
    (a, b), (p, q) = chunks(cj)[0]
    empty = node.run({"latent": latents[:, :0], "cond": lq[:, :0]}, state, Step(block=0, inputs={}))["pixels"]
    assert empty.shape[1] == 0 and empty.shape[-2:] == lq.shape[-2:]
    with pytest.raises(FdError, match="cond"):      # the DiT window's frames wired instead of the decoder's
        node.run({"latent": latents[:, a:b], "cond": lq[:, p:q + 4]}, state, Step(block=1, inputs={}))
    # the empty block did not count as the first decode: the 3-frame trim still applies
    out = node.run({"latent": latents[:, a:b], "cond": lq[:, p:q]}, state, Step(block=2, inputs={}))["pixels"]
    torch.testing.assert_close(out, ref(outputs, "stream.0.adain"), **tol(cj, "colour_corrected"))


def test_node_snapshot_resumes_the_stream(case, checkpoint):
    cj, _, latents, lq, outputs = case
    node = _node(checkpoint, latents.shape[2])
    first = node.new_state()
    (a, b), (p, q) = chunks(cj)[0]
    node.run({"latent": latents[:, a:b], "cond": lq[:, p:q]}, first, Step(block=0, inputs={}))
    values = node.state_tensors(first)
    resumed = node.load_state(node.new_state(), dict(values))
    k = 1
    (a, b), (p, q) = chunks(cj)[k]
    out = node.run({"latent": latents[:, a:b], "cond": lq[:, p:q]}, resumed, Step(block=k, inputs={}))["pixels"]
    torch.testing.assert_close(out, ref(outputs, f"stream.{k}.adain"), **tol(cj, "colour_corrected"))


def test_node_refuses_a_checkpoint_of_another_model(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"decoder.1.weight": torch.zeros(4, 5, 3, 3)}, str(path))
    node = FlashVSRDecodeNode("decode", {"checkpoint": str(path), "dtype": "fp32"})
    with pytest.raises(FdError, match="not a TCDecoder checkpoint"):
        node.load()
