"""Parity of nodes.wan.vae / vae_stream with upstream WanVAE_ (golden case ``wan_vae``).

Every shape, chunking and tolerance is read from the case files, so other golden sets
(other dim, frames, H != W) run through the same tests.
"""
from __future__ import annotations

import pytest
import torch
from goldens import case_json, tensors
from torch.testing import assert_close

from nodes.wan.vae import WanVAE
from nodes.wan.vae_stream import StreamingDecoder, StreamingEncoder

CASE = "wan_vae"


@pytest.fixture(scope="module")
def case():
    return case_json(CASE)


@pytest.fixture(scope="module")
def io(case):
    files = case["files"]
    return {**tensors(CASE, files["inputs"]), **tensors(CASE, files["outputs"])}


@pytest.fixture(scope="module")
def vae(case, io):
    model = WanVAE.from_state_dict(tensors(CASE, case["files"]["weights"]))
    model.set_latent_stats(io["latent_mean"], io["latent_std"])
    return model


def _tol(case, key):
    t = case["tolerance"][key]
    return dict(atol=t["atol"], rtol=t["rtol"])


def test_config_from_state_dict_matches_case(case):
    sd = tensors(CASE, case["files"]["weights"])
    kwargs = case["model_kwargs"]
    WanVAE(**kwargs).load_state_dict(sd, strict=True)
    inferred = WanVAE.from_state_dict(sd)
    assert inferred.z_dim == kwargs["z_dim"]
    assert inferred.encoder.conv1.out_channels == kwargs["dim"]


def test_encode(case, io, vae):
    latent = vae.encode(io["video"])
    assert latent.shape == io["latent"].shape
    assert_close(latent, io["latent"], **_tol(case, "latent"))


def test_decode(case, io, vae):
    decoded = vae.decode(io["latent"])
    assert decoded.shape == io["decoded"].shape
    assert_close(decoded, io["decoded"], **_tol(case, "decoded"))
    assert vae.decode(io["latent"], clamp=True).abs().max() <= 1.0


def _chunkings(case, n_latent):
    return [[(s, min(s + k, n_latent)) for s in range(0, n_latent, k)] for k in (1, 3)]


def test_streaming_decode_recorded_chunks(case, io, vae):
    dec = StreamingDecoder(vae)
    for c in case["cached_decode_chunks"]:
        (a, b), (p0, p1) = c["latent_frames"], c["pixel_frames"]
        got = dec.decode_chunk(io["latent"][:, :, a:b])
        assert_close(got, io["decoded"][:, :, p0:p1], **_tol(case, "decoded"))


def test_streaming_decode_any_chunking(case, io, vae):
    latent, decoded = io["latent"], io["decoded"]
    for ranges in _chunkings(case, latent.shape[2]):
        dec = StreamingDecoder(vae)
        pixels = [dec.decode_chunk(latent[:, :, a:b]) for a, b in ranges]
        assert_close(torch.cat(pixels, dim=2), decoded, **_tol(case, "decoded"))


@pytest.mark.parametrize("channels_last", [False, True])
def test_streaming_decode_fast_convs_any_chunking(case, io, vae, channels_last):
    """The CUDA default's conv reformulation (FusedOps.make's tap_head: the RGB head as a GEMM to its per-tap
    products and their shifted sum), here eager on the CPU, in both memory formats (the GEMM reads the window as
    it lies): the upstream decode under any chunking."""
    import copy

    from nodes.wan.vae_blocks import CausalConv3d, _tap_weights
    latent, decoded = io["latent"], io["decoded"]
    if channels_last:
        vae = copy.deepcopy(vae).to_channels_last()
        latent = latent.contiguous(memory_format=torch.channels_last_3d)
    convs = [m for m in vae.decoder.modules() if isinstance(m, CausalConv3d) and m.kernel_size[0] == 3]
    want = any(c.out_channels < 16 for c in convs)
    for ranges in _chunkings(case, latent.shape[2]):
        dec = StreamingDecoder(vae, fast_convs=True)
        pixels = [dec.decode_chunk(latent[:, :, a:b]) for a, b in ranges]
        assert_close(torch.cat(pixels, dim=2), decoded, **_tol(case, "decoded"))
        assert any(build is _tap_weights for build, _ in dec.fused._weights) == want    # the tap-sum route ran


def test_decoder_autotunes_every_cudnn_plan_only_while_decoding(case, io, vae, monkeypatch):
    """cuDNN's fastest plan for the 96-channel conv lies past torch's first ten (nodes/common/conv.py): while a
    streamed chunk decodes, cudnn.benchmark is on with no plan limit (a long one-shot chunk: the caller's); before
    and after, the caller's settings stand, also when the decode raises; autotune=False leaves them alone."""
    import torch.nn.functional as F
    seen = []
    real = F.conv3d

    def spy(*a, **k):
        seen.append((torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit))
        return real(*a, **k)
    monkeypatch.setattr(F, "conv3d", spy)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark_limit", 7)
    StreamingDecoder(vae).decode_chunk(io["latent"][:, :, :1])
    assert seen and set(seen) == {(True, 0)}
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit) == (False, 7)
    seen.clear()
    StreamingDecoder(vae, autotune=False).decode_chunk(io["latent"][:, :, :1])
    assert set(seen) == {(False, 7)}
    with pytest.raises(RuntimeError):
        StreamingDecoder(vae).decode_chunk(io["latent"][:, :3, :1])          # wrong channel count
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.benchmark_limit) == (False, 7)
    # a one-shot decode of a long clip keeps the caller's plan limit (each of its shapes runs once per clip)
    from nodes.wan.vae_stream import ALL_PLANS_MAX_LATENT_FRAMES
    long = io["latent"][:, :, :1].repeat(1, 1, ALL_PLANS_MAX_LATENT_FRAMES + 1, 1, 1)
    seen.clear()
    StreamingDecoder(vae).decode_chunk(long)
    assert set(seen) == {(True, 7)}
    seen.clear()
    StreamingDecoder(vae).decode_chunk(long[:, :, :ALL_PLANS_MAX_LATENT_FRAMES])
    assert set(seen) == {(True, 0)}


def test_streaming_decode_reset_reuses_cache(case, io, vae):
    latent = io["latent"]
    dec = StreamingDecoder(vae)
    dec.decode_chunk(latent[:, :, :2])
    storage = [t.data_ptr() for t in dec.cache]
    dec.reset()
    pixels = torch.cat([dec.decode_chunk(latent[:, :, s:s + 2])
                        for s in range(0, latent.shape[2], 2)], dim=2)
    assert [t.data_ptr() for t in dec.cache] == storage
    assert_close(pixels, io["decoded"], **_tol(case, "decoded"))


def test_streaming_encode(case, io, vae):
    video, step = io["video"], vae.temporal_factor
    n = 1 + (video.shape[2] - 1) // step
    upstream = [(0, 1)] + [(1 + step * (i - 1), 1 + step * i) for i in range(1, n)]
    end = upstream[-1][1]
    wider = [(0, min(1 + step, end))] + [(s, min(s + 2 * step, end))
                                         for s in range(1 + step, end, 2 * step)]
    for ranges in (upstream, wider):
        enc = StreamingEncoder(vae)
        latent = torch.cat([enc.encode_chunk(video[:, :, a:b]) for a, b in ranges], dim=2)
        assert_close(latent, io["latent"], **_tol(case, "latent"))
    enc = StreamingEncoder(vae)
    with pytest.raises(ValueError):
        enc.encode_chunk(video[:, :, :2])


def test_demo_block3_stream(case, io, vae):
    names = sorted((k for k in case["tensors"] if k.startswith("block3_stream_chunk.")),
                   key=lambda k: int(k.rsplit(".", 1)[1]))
    assert names
    latent_btchw = io["latent"].permute(0, 2, 1, 3, 4)
    dec = StreamingDecoder.demo(vae)
    start = 0
    for name in names:
        want = io[name]
        frames = want.shape[1] // 4  # zero cache: every latent frame yields 4 pixel frames
        got = dec.decode_chunk(latent_btchw[:, start:start + frames])
        start += frames
        assert got.shape == want.shape
        assert_close(got, want, **_tol(case, "block3_stream_chunk"))
    expected = [list(s) for s in case["block3_zero_cache_shapes"]]
    assert [list(t.shape) for t in dec.cache] == expected


def test_streams_resume_from_a_snapshot_in_their_memory_format(case, io, vae):
    """Both streams' snapshots record each cache's memory format: values saved to a file come back contiguous,
    and a channels-last stream resumed from them has its caches in the formats they had and continues bit for
    bit (a contiguous cache changes the conv arithmetic). The encoder's restore lost the format before it
    shared the decoder's snapshot code."""
    import copy
    cl = copy.deepcopy(vae).to_channels_last()
    video, latent, step = io["video"], io["latent"], vae.temporal_factor
    fmt = dict(memory_format=torch.channels_last_3d)
    groups, n_lat = (video.shape[2] - 1) // step, latent.shape[2]      # the case's own lengths, cut in two
    assert groups >= 2 and n_lat >= 2, "the case needs two chunks per stream"
    cut = 1 + step * (groups // 2)
    streams = ((StreamingEncoder, "encode_chunk", video[:, :, :cut], video[:, :, cut:1 + step * groups]),
               (StreamingDecoder, "decode_chunk", latent[:, :, :n_lat // 2], latent[:, :, n_lat // 2:]))
    layouts = []
    for make, call, first, second in streams:
        a = make(cl)
        getattr(a, call)(first.contiguous(**fmt))
        formats = [t.is_contiguous(**fmt) and not t.is_contiguous() for t in a.cache]
        saved = {k: v.contiguous().clone() if torch.is_tensor(v) else v for k, v in a.state_tensors().items()}
        want = getattr(a, call)(second.contiguous(**fmt))
        b = make(cl)
        b.load_state(saved)
        assert [t.is_contiguous(**fmt) and not t.is_contiguous() for t in b.cache] == formats
        assert torch.equal(getattr(b, call)(second.contiguous(**fmt)), want)
        layouts += formats
    assert any(layouts)                  # some cache was channels-last: the case the restore has to keep


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_upsamples_match_the_plain_formulation(channels_last):
    """FusedOps' spatial upsample (sub-pixel conv, then phases interleaved with the bias in one pass) against
    nearest x2 + the 3x3 conv per frame, and its temporal one (conv without bias, then channels -> frames with the
    bias) against the conv with bias and upstream's reshape; outputs channels-last whatever the input."""
    import torch.nn.functional as F
    from torch import nn

    from nodes.wan.vae_blocks import CausalConv3d, ConvCache, FusedOps
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 6, 3, 5, 7, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    conv = nn.Conv2d(6, 4, 3, padding=1).double()
    ops = FusedOps()
    got = ops.upsample(conv, x)
    up = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
    want = F.conv3d(up, conv.weight.unsqueeze(2), conv.bias, padding=(0, 1, 1))
    assert_close(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)

    tconv = CausalConv3d(6, 12, (3, 1, 1), padding=(1, 0, 0)).double()
    got = ops.time_frames(tconv, x, ConvCache([], first=False))
    y = F.conv3d(F.pad(x, (0, 0, 0, 0, 2, 0)), tconv.weight, tconv.bias)
    want = y.view(1, 2, 6, 3, 5, 7).permute(0, 2, 3, 1, 4, 5).reshape(1, 6, 6, 5, 7)
    assert_close(got, want)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)


def _glue_uncompiled(**kw):
    """FusedOps as on CUDA (compiled glue: convs without bias, biases and residual sums folded into the pointwise
    functions; without the tap-sum head, which adds its bias itself: test_streaming_decode_fast_convs_*) but with
    each function run as plain torch ops, so the CPU checks the formulas Inductor compiles; ``ran`` records the
    names of the functions that ran."""
    from nodes.wan.vae_blocks import FusedOps

    class Ops(FusedOps):
        def _get(self, fn, key):
            self.ran.add(fn.__name__)
            return fn
    ops = Ops(compile=True, **kw)
    ops.ran = set()
    return ops


@pytest.mark.parametrize("fold", [True, False])
def test_compiled_glue_formulas_match_upstream_any_chunking(case, io, vae, fold):
    """The CUDA decode path's formulas: every residual sum added inside the next norm window (fold) or written
    first, attention as two GEMMs and one softmax (every head dim here): the upstream decode under any chunking."""
    latent, decoded = io["latent"], io["decoded"]
    for ranges in _chunkings(case, latent.shape[2]):
        ops = _glue_uncompiled(fold_residuals=fold, matmul_attention_min_dim=0)
        dec = StreamingDecoder(vae, fused_ops=ops)
        pixels = [dec.decode_chunk(latent[:, :, a:b]) for a, b in ranges]
        assert_close(torch.cat(pixels, dim=2), decoded, **_tol(case, "decoded"))
        assert {n for n in ops.ran if "window" in n} == ({"_window_compiled", "_residual_window"} if fold
                                                        else {"_window_compiled"})
        assert {"_scaled_softmax", "_residual"} <= ops.ran     # before attention and upsamplers a sum is written


def test_matmul_attention_matches_sdpa_in_groups():
    """FusedOps.attention's GEMM + softmax form against SDPA, with the frames split over several score groups."""
    import torch.nn.functional as F

    from nodes.wan.vae_blocks import FusedOps
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(5, 1, 24, 40, generator=g, dtype=torch.float64) for _ in range(3))
    ops = FusedOps(matmul_attention_min_dim=33)
    ops.scores_per_group = 2 * 24 * 24                   # groups of 2, 2, 1 frames
    assert_close(ops.attention(q, k, v).double(), F.scaled_dot_product_attention(q, k, v))
    small = q[..., :32], k[..., :32], v[..., :32]       # under the threshold: SDPA itself
    assert torch.equal(ops.attention(*small), F.scaled_dot_product_attention(*small))
