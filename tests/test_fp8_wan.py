"""The Wan DiT's fast-mode choices on CPU with tiny random weights: context-pass reuse (the cache after a
reused block = the K/V of its last denoising forward, computed independently), the FP8 KV cache through a
stream and its snapshot, FP8 linears and FP8 attention (emulated) swapped into the model, and the wan.dit
params at planning time (FP8 compute refused off a FP8 GPU, with the param's line; fd viz shows them)."""
import pytest
import torch

from engine import load_plan
from engine.errors import SpecErrors
from nodes.common.causal import StreamSpec
from nodes.common.fp8 import E4M3, Fp8Linear
from nodes.common.kv_cache import SelfKVCache
from nodes.wan.causal import WanDenoiser
from nodes.wan.config import WanConfig
from nodes.wan.dit import WanDiT

FRAME = (4, 4, 6)      # latent C, H, W of the tiny model: 2x2 patches -> 6 tokens per frame
NFPB = 2


def _model(seed=0, **kw) -> WanDiT:
    torch.manual_seed(seed)
    cfg = WanConfig(**{**dict(text_len=8, in_dim=4, dim=32, ffn_dim=48, text_dim=8, out_dim=4, num_heads=2,
                              num_layers=2), **kw})
    m = WanDiT(cfg).eval().requires_grad_(False)
    m.head.head.weight.normal_(0, 0.2)
    return m


def _stream(m: WanDiT, context_pass="full", kv_dtype=None, window=6):
    den = WanDenoiser(m, m.cfg, torch.float32, "auto", kv_dtype, context_pass)
    s = den.open_stream(StreamSpec(frame_shape=FRAME, frames_per_block=NFPB, window_frames=window))
    s.set_conditions(torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(9)))
    return s


def _forwards(m: WanDiT) -> list:
    calls = []
    m.patch_embedding.register_forward_hook(lambda *a: calls.append(1))
    return calls


STEPS = (1000.0, 750.0, 500.0, 250.0)


def _block(stream, frame_start, g):
    """Self-Forcing's block loop on the stream: 4 denoising calls, then the context pass on x0 at t=0."""
    x = torch.randn(1, NFPB, *FRAME, generator=g)
    for i, t in enumerate(STEPS):
        flow = stream.denoise(x, t, frame_start)
        x0 = x - (t / 1000) * flow
        last = (x, t)
        if i + 1 < len(STEPS):
            x = (1 - STEPS[i + 1] / 1000) * x0 + STEPS[i + 1] / 1000 * torch.randn(x.shape, generator=g)
    stream.commit(x0, 0.0, frame_start)
    return last, x0


def _rollouts(streams, blocks: int, seed: int = 4) -> list:
    """Each stream through the same ``blocks`` blocks (same noise), then one more denoising call: its flow."""
    outs = []
    for st in streams:
        g = torch.Generator().manual_seed(seed)
        for b in range(blocks):
            _block(st, b * NFPB, g)
        outs.append(st.denoise(torch.ones(1, NFPB, *FRAME), 500.0, blocks * NFPB))
    return outs


def test_context_reuse_keeps_the_last_steps_kv_and_skips_one_forward():
    m = _model()
    full, reuse = _stream(m, "full"), _stream(m, "reuse")
    calls = _forwards(m)
    g = torch.Generator().manual_seed(1)
    _block(reuse, 0, g)                                  # block 0: fills the cache (reuse, too)
    assert len(calls) == len(STEPS)                     # no context forward
    before = {k: t.clone() for k, t in reuse.cache.buffers().items()}
    (x_last, t_last), _ = _block(reuse, NFPB, g)
    # independent: a fresh cache holding block 0's rows, one forward of the last step's input at its t
    ref = SelfKVCache(m.cfg.num_layers, m.cfg.num_heads, m.cfg.head_dim, 6, window_frames=6)
    ref.k.copy_(before["k"]), ref.v.copy_(before["v"])
    m.forward_causal(x_last, torch.full((1, NFPB), t_last), reuse.denoiser.cross, ref, NFPB)
    assert torch.equal(reuse.cache.k, ref.k) and torch.equal(reuse.cache.v, ref.v)
    # the full pass differs exactly in the block's rows: they hold x0 at t=0 instead
    g = torch.Generator().manual_seed(1)
    _block(full, 0, g)
    before = {k: t.clone() for k, t in full.cache.buffers().items()}
    _, x0 = _block(full, NFPB, g)
    rows = slice(NFPB * 6, 2 * NFPB * 6)
    assert not torch.allclose(full.cache.k[:, :, rows], reuse.cache.k[:, :, rows])
    ref.k.copy_(before["k"]), ref.v.copy_(before["v"])
    m.forward_causal(x0, torch.zeros(1, NFPB), full.denoiser.cross, ref, NFPB)
    torch.testing.assert_close(full.cache.k[:, :, rows], ref.k[:, :, rows])


def test_context_reuse_still_commits_without_a_denoised_block():
    """An image prefix or a recache commit has no denoising call before it: its forward runs."""
    m = _model()
    s = _stream(m, "reuse")
    calls = _forwards(m)
    s.commit(torch.randn(1, NFPB, *FRAME), 0.0, 0)
    assert len(calls) == 1 and s.cache.k.abs().sum() > 0
    s.denoise(torch.randn(1, NFPB, *FRAME), 500.0, NFPB)
    s.commit(torch.randn(1, NFPB, *FRAME), 0.0, 0)        # another block than the one denoised
    assert len(calls) == 3
    s.reset()
    s.commit(torch.randn(1, NFPB, *FRAME), 0.0, 0)
    assert len(calls) == 4


def test_fp8_kv_cache_stream_and_snapshot():
    m = _model()
    ref, f8 = _stream(m), _stream(m, kv_dtype=E4M3)
    assert f8.cache.k.dtype == E4M3 and f8.cache.read_dtype == torch.float32
    outs = _rollouts((ref, f8), blocks=4, seed=2)            # past the 6-frame window: the ring wraps
    rel = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
    assert 0 < rel < 0.1, rel
    snap = {k: t.clone() for k, t in f8.state_tensors().items()}
    assert set(snap) == {"k", "v", "k_scale", "v_scale"}
    f8.reset()
    assert f8.cache.k_scale.abs().sum() == 0
    f8.load_state_tensors(snap)
    again = f8.denoise(torch.ones(1, NFPB, *FRAME), 500.0, 4 * NFPB)
    assert torch.equal(again, outs[1])


def test_fp8_cache_feeds_fp8_attention_without_dequantising(monkeypatch):
    m = _model()
    ref = _stream(m)
    m2 = _model().use_fp8_attention("head")
    s = _stream(m2, kv_dtype=E4M3)
    reads = {"raw": 0, "deq": 0}
    raw, deq = s.cache.quantized_values, s.cache.keys_values
    monkeypatch.setattr(s.cache, "quantized_values", lambda *a: reads.__setitem__("raw", reads["raw"] + 1) or raw(*a))
    monkeypatch.setattr(s.cache, "keys_values", lambda *a: reads.__setitem__("deq", reads["deq"] + 1) or deq(*a))
    outs = _rollouts((ref, s), blocks=3)
    assert reads["raw"] > 0 and reads["deq"] == 0
    rel = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
    assert 0 < rel < 0.1, rel


def test_fp8_linears_and_attention_in_the_model():
    m = _model()
    x, t = torch.randn(1, NFPB, *FRAME), torch.full((1, NFPB), 500.0)
    cross = m.prepare_cross(torch.randn(1, 5, 8))
    cache = lambda: SelfKVCache(2, 2, 16, 6, max_frames=NFPB)  # noqa: E731
    base = m.forward_causal(x, t, cross, cache(), 0)
    assert m.use_fp8_linears() == len(WanDiT.FP8_LINEARS) * m.cfg.num_layers
    blk = m.blocks[0]
    assert isinstance(blk.self_attn.q, Fp8Linear) and isinstance(blk.ffn[2], Fp8Linear)
    assert not isinstance(blk.cross_attn.k, Fp8Linear) and not isinstance(m.head.head, Fp8Linear)
    lin = m.forward_causal(x, t, cross, cache(), 0)
    m.use_fp8_attention("head")
    both = m.forward_causal(x, t, cross, cache(), 0)
    for out in (lin, both):
        rel = ((out - base).norm() / base.norm()).item()
        assert 0 < rel < 0.2, rel
    assert not torch.equal(lin, both)
    h = torch.randn(1, 7, m.cfg.dim)
    assert torch.equal(blk._ffn(h, m.kernels), blk.ffn(h))     # GELU fused into the quantiser = the plain chain


def test_fp8_linear_inputs_quantised_in_the_elementwise_pass_equal_the_two_pass_chain():
    """AdaLN (and the cross-attention LayerNorm) with the per-token quantisation in the same function gives the
    very bytes and scales of the plain function followed by quantize_rows."""
    from nodes.common.fp8 import QuantizedRows
    from nodes.wan.dit import EAGER, _in_rows
    m = _model()
    m.use_fp8_linears()
    blk, k = m.blocks[0], EAGER
    x = torch.randn(1, 12, m.cfg.dim) * 3
    shift, scale = torch.randn(1, 2, 1, m.cfg.dim), torch.randn(1, 2, 1, m.cfg.dim)
    for fused, plain in ((_in_rows(k, blk.ffn[0], x, k.modulate, k.modulate_quant, shift, scale, 2, 1e-6, torch.float32),
                          k.modulate(x, shift, scale, 2, 1e-6, torch.float32)),
                         (_in_rows(k, blk.cross_attn.q, x, k.ln_cast, k.ln_quant, None, None, 1e-6, torch.float32),
                          k.ln_cast(x, None, None, 1e-6, torch.float32))):
        want = QuantizedRows.of(plain, k.quant_rows)
        assert isinstance(fused, QuantizedRows) and fused.lead == want.lead == (1, 12)
        assert torch.equal(fused.data.view(torch.uint8), want.data.view(torch.uint8))
        assert torch.equal(fused.scale, want.scale)
    bf = _model()     # a model without FP8 linears gets the plain tensor
    assert torch.equal(_in_rows(k, bf.blocks[0].ffn[0], x, k.modulate, k.modulate_quant, shift, scale, 2, 1e-6,
                                torch.float32), k.modulate(x, shift, scale, 2, 1e-6, torch.float32))


def test_fast_mode_stream_reads_its_cache_as_stored_and_feeds_the_o_projection_in_fp8(monkeypatch):
    """FP8 linears + FP8 attention (tensor scales) + an FP8 cache at one running scale per layer: attention gets
    the stored e4m3 rows with scalar descales, its e4m3 output goes to the o projection as is, and the stream
    stays close to the float model over a rollout that wraps the window."""
    import nodes.common.fp8_attention as fa
    m = _model()
    ref = _stream(m)
    m2 = _model()
    m2.use_fp8_linears()
    m2.use_fp8_attention("tensor")
    den = WanDenoiser(m2, m2.cfg, torch.float32, "auto", E4M3, "full", "tensor")
    s = den.open_stream(StreamSpec(frame_shape=FRAME, frames_per_block=NFPB, window_frames=6))
    s.set_conditions(torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(9)))
    assert s.cache.tensor_scaled and s.cache.k_scale.shape == (2, 1, 1, 1, 1)
    seen = {"scalar_scales": 0, "rows": 0}
    raw_values, raw_rows = s.cache.quantized_values, fa.fp8_attention_rows

    def values(*a):
        out = raw_values(*a)
        seen["scalar_scales"] += out[1].numel() == 1 and out[3].numel() == 1
        return out

    def rows(*a, **kw):
        seen["rows"] += 1
        return raw_rows(*a, **kw)
    monkeypatch.setattr(s.cache, "quantized_values", values)
    monkeypatch.setattr(fa, "fp8_attention_rows", rows)
    outs = _rollouts((ref, s), blocks=4)
    calls = 4 * 5 * 2 + 2                 # 4 blocks x (4 steps + context pass) x 2 layers, then the last call
    assert seen == {"scalar_scales": calls, "rows": calls}
    rel = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
    assert 0 < rel < 0.2, rel
    snap = {k: t.clone() for k, t in s.state_tensors().items()}      # a session snapshot keeps the running scales
    assert snap["k_scale"].shape == (2, 1, 1, 1, 1) and (snap["k_scale"] > 0).all()
    s.reset()
    s.load_state_tensors(snap)
    assert torch.equal(s.denoise(torch.ones(1, NFPB, *FRAME), 500.0, 4 * NFPB), outs[1])


def test_node_keeps_the_fp8_cache_at_the_scaling_its_attention_reads():
    fast = ["nodes.dit.params.kv_dtype=fp8", "nodes.dit.params.attention_precision=fp8", "nodes.dit.device=cuda"]
    cases = [(fast, "tensor"), (fast + ["nodes.dit.params.fp8_attention_scaling=head"], "row"),
             (["nodes.dit.params.kv_dtype=fp8"], "row")]
    for overrides, want in cases:
        plan = load_plan("tiny_self_forcing", overrides, cuda_devices=0, check_devices=False)
        assert plan.nodes["dit"].build().kv_scaling() == want, overrides


# ------------------------------------------------------------------ params at planning time
def test_fp8_compute_refused_on_cpu_with_the_param_line():
    with pytest.raises(SpecErrors) as e:
        load_plan("tiny_self_forcing", ["nodes.dit.params.precision=fp8", "nodes.dit.params.attention_precision=fp8"],
                  cuda_devices=0)
    errs = e.value.errors
    assert {x.field for x in errs} == {"params.precision", "params.attention_precision"}
    assert all(x.code == "unsupported_on_device" and "cpu" in x.message for x in errs)


def test_cpu_capable_choices_plan_and_show_in_viz():
    """kv_dtype: fp8 and context_pass: reuse run on CPU; fd viz's drawing carries them with the node's params."""
    from engine import viz
    plan = load_plan("tiny_self_forcing", ["nodes.dit.params.kv_dtype=fp8", "nodes.dit.params.context_pass=reuse"],
                     cuda_devices=0)
    html = viz.to_html(plan)
    for text in ('"kv_dtype": "fp8"', '"context_pass": "reuse"', '"precision": "auto"', '"attention_precision"'):
        assert text in html, text


def test_viz_notes_say_what_runs_in_fp8_and_how_the_cache_is_kept():
    from engine.viz.model import build
    fast = ["nodes.dit.params.kv_dtype=fp8", "nodes.dit.params.attention_precision=fp8", "nodes.dit.device=cuda"]
    notes = build(load_plan("tiny_self_forcing", fast, cuda_devices=0, check_devices=False)).nodes["dit"].notes
    assert any(n.startswith("attention: self: cuDNN sdpa_fp8 (e4m3, tensor scales, fp8 output); cross: ")
               for n in notes), notes
    assert "KV cache: e4m3, one running scale per layer, read by the FP8 attention as stored" in notes
    notes = build(load_plan("tiny_self_forcing", ["nodes.dit.params.kv_dtype=fp8"], cuda_devices=0)).nodes["dit"].notes
    assert "KV cache: e4m3, a float32 scale per (token, head)" in notes
    assert "attention: auto → torch SDPA on cpu" in notes


def test_fp8_kv_cache_counted_in_the_memory_plan():
    from nodes.ar.memory import kv_cache
    base = load_plan("tiny_self_forcing", cuda_devices=0)
    f8 = load_plan("tiny_self_forcing", ["nodes.dit.params.kv_dtype=fp8"], cuda_devices=0)
    sizes = []
    for plan in (base, f8):
        dit, sampler = plan.nodes["dit"].build(), plan.nodes["sampler"].build()
        sizes.append(kv_cache(sampler.p, dit.cache_layout()))
    assert sizes[1]["dtype"] == "float8_e4m3fn"
    head_dim = 64 // 4
    assert sizes[1]["bytes"] == int(sizes[0]["bytes"] / 4 * (1 + 4 / head_dim))   # fp32 -> 1 byte + scale
    fast = load_plan("tiny_self_forcing", ["nodes.dit.params.kv_dtype=fp8", "nodes.dit.params.attention_precision=fp8",
                                           "nodes.dit.device=cuda"], cuda_devices=0, check_devices=False)
    sized = kv_cache(fast.nodes["sampler"].build().p, fast.nodes["dit"].build().cache_layout())
    assert sized["bytes"] == int(sizes[0]["bytes"] / 4)                            # one running scale per layer


def test_fp8_on_a_cuda_node_checked_on_a_machine_without_cuda_is_left_to_the_gpu():
    load_plan("tiny_self_forcing", ["nodes.dit.params.precision=fp8", "nodes.dit.device=cuda"],
              cuda_devices=0, check_devices=False)


def test_fast_mode_sessions_batched_equal_each_session_alone():
    """fd serve batches sessions through one forward; with FP8 linears, FP8 attention and the tensor-scaled FP8
    cache each session's rows still take the very call it makes alone (FP8 attention, e4m3 rows into the o
    projection), so a batch changes no bit of any session's flow."""
    from nodes.common.causal import BlockCall

    def fast_model():
        m = _model()
        m.use_fp8_linears()
        m.use_fp8_attention("tensor")
        return WanDenoiser(m, m.cfg, torch.float32, "auto", E4M3, "full", "tensor")

    model = fast_model()
    spec = StreamSpec(frame_shape=FRAME, frames_per_block=NFPB, window_frames=6)
    g = torch.Generator().manual_seed(0)
    starts = [0, 2, 6]
    texts = [torch.randn(1, 5, 8, generator=g) for _ in starts]

    def streams():
        out = []
        for text, start in zip(texts, starts):
            s = model.open_stream(spec)
            s.set_conditions(text)
            for fs in range(0, start, NFPB):
                s.commit(torch.randn(1, NFPB, *FRAME, generator=torch.Generator().manual_seed(fs)), 0.0, fs)
            out.append(s)
        return out

    calls = [BlockCall("denoise", torch.randn(1, NFPB, *FRAME, generator=g), 700.0 - 100 * i, start, {})
             for i, start in enumerate(starts)]
    lone = [s.denoise(c.x, c.t, c.frame_start) for s, c in zip(streams(), calls)]
    together = model.run_together(streams(), calls)
    assert model._batchable(streams(), calls)
    for i, (a, b) in enumerate(zip(lone, together)):
        assert torch.equal(a, b), f"session {i}: max |diff| {(a - b).abs().max():.3g}"
