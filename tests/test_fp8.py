"""FP8 fast mode on CPU: e4m3 round trips against their derived bounds, the FP8 linear and the FP8 attention
arithmetic against independent float64 re-derivations, the FP8 KV cache through the cache code, the wan.dit
fast-mode params at planning time. (The CUDA kernels are measured against bf16 by benchmarks/device_fp8.sh.)

Bounds: e4m3 rounds to nearest with 3 mantissa bits, so a scaled value in the normal range moves by at most
u = 2^-4 of itself and a subnormal one by at most half the subnormal step, 2^-10 (``roundtrip_bound``);
float32 scaling around it adds a few 2^-24.
"""
import math

import pytest
import torch

from nodes.common.fp8 import (E4M3, E4M3_MAX, Fp8Linear, QuantizedRows, amax_scale, dequantize, quantize,
                              quantize_rows, roundtrip_bound)
from nodes.common.fp8_attention import emulate_sdpa_fp8, quantized_qkv
from nodes.common.kv_cache import SelfKVCache

U = 2.0 ** -4
F32 = 2.0 ** -22          # slack for the float32 divide and multiply around the rounding


def _spread(*shape, seed=0):
    """Gaussian values times magnitudes spanning 2^-12 .. 2^4: normals and subnormals after scaling."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return x * torch.pow(2.0, torch.randint(-12, 5, shape, generator=g).float())


@pytest.mark.parametrize("dims", [None, -1, (0, 2)])
def test_roundtrip_within_derived_bound(dims):
    x = _spread(6, 40, 3)
    s = amax_scale(x, dims)
    x8 = quantize(x, s)
    assert x8.dtype == E4M3
    back = dequantize(x8, s)
    err = (back - x).abs()
    bound = roundtrip_bound(x, s) + F32 * x.abs()
    assert (err <= bound).all(), (err - bound).max()
    assert (err / roundtrip_bound(x, s)).max() > 0.5           # some value rounds by most of its bound: it is tight
    amax_pos = x.abs() == x.abs().amax(dim=dims, keepdim=True) if dims is not None else x.abs() == x.abs().max()
    assert torch.equal(x8.float().abs()[amax_pos], torch.full_like(x[amax_pos], E4M3_MAX))


def test_roundtrip_zero_rows_and_foreign_scale():
    x = torch.zeros(3, 16)
    x8, s = quantize_rows(x)
    assert torch.equal(dequantize(x8, s), x)
    y = torch.full((2, 16), 1e6)                     # a scale from another tensor saturates, never NaN
    assert torch.isfinite(dequantize(quantize(y, torch.tensor(1.0)), torch.tensor(1.0))).all()


def _quant_err(x, s):
    return roundtrip_bound(x, s) + F32 * x.abs()


def test_fp8_linear_matches_dequantised_product_and_bound():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = _spread(2, 7, 64, seed=1)
    f = Fp8Linear.from_linear(lin)
    y = f(x)
    assert y.shape == (2, 7, 48) and f.weight_fp8.dtype == E4M3
    # (1) = the dequantised operands' product in float64 (the kernel's float32 accumulation aside)
    x8, sx = quantize_rows(x.reshape(-1, 64))
    ref = (dequantize(x8, sx).double() @ f.dequantized_weight().double().T + lin.bias.double()).reshape(y.shape)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # (2) within the bound the operand roundings imply: |x^w^ - xw| <= |x| e_w + e_x |w| + e_x e_w, summed over k
    w = lin.weight.detach()
    ex = _quant_err(x.reshape(-1, 64), sx)
    ew = _quant_err(w, amax_scale(w, -1))
    bound = (x.reshape(-1, 64).abs() @ ew.T + ex @ w.abs().T + ex @ ew.T).reshape(y.shape)
    exact = lin(x).detach()
    assert ((y - exact).abs() <= bound * (1 + 1e-4) + 1e-6).all()
    assert ((y - exact).abs() > 0).any()


def test_fp8_linear_takes_a_shared_quantised_input():
    torch.manual_seed(0)
    a, b = (Fp8Linear.from_linear(torch.nn.Linear(32, 16)) for _ in range(2))
    x = torch.randn(3, 32)
    q = QuantizedRows.of(x)
    assert torch.equal(a(q), a(x)) and torch.equal(b(q), b(x))
    with pytest.raises(ValueError, match="divisible by 16"):
        Fp8Linear.from_linear(torch.nn.Linear(32, 20))


def _qkv(heads_scale=(1.0, 1.0), lq=6, lk=10, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.tensor(heads_scale).view(1, 1, -1, 1)
    q, k, v = (torch.randn(1, n, len(heads_scale), d, generator=g) * hs for n in (lq, lk, lk))
    return q, k, v


@pytest.mark.parametrize("scaling", ["tensor", "head"])
def test_fp8_scores_fold_back_to_qk(scaling):
    """However the scales are folded, dequantised Q8 . K8 reproduces q . k within the operand roundings."""
    q, k, v = _qkv(heads_scale=(1.0, 2.0 ** 6))
    qq = quantized_qkv(q, k, v, scaling)
    qd, kd = qq.q.float() * qq.descale_q, qq.k.float() * qq.descale_k
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd)
    exact = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double())
    if scaling == "head":                   # Q8 holds q * b_h, K8 holds k / b_h
        b = amax_scale(k, (0, 1, 3))
        qf, kf = q * b, k / b
    else:
        qf, kf = q, k
    eq, ek = _quant_err(qf, qq.descale_q), _quant_err(kf, qq.descale_k * (qq.descale_k.new_ones(1)))
    bound = (torch.einsum("bqhd,bkhd->bhqk", qf.abs(), ek) + torch.einsum("bqhd,bkhd->bhqk", eq, kf.abs())
             + torch.einsum("bqhd,bkhd->bhqk", eq, ek))
    assert ((s.double() - exact).abs() <= bound.double() * (1 + 1e-4) + 1e-6).all()


@pytest.mark.parametrize("scaling", ["tensor", "head"])
@pytest.mark.parametrize("out", ["fp8", "bf16"])
def test_fp8_attention_emulation_vs_float64(scaling, out):
    """The emulation = exact softmax attention over the dequantised Q/K/V, up to the P rounding (relative u,
    subnormal 2^-10/448) and, for an FP8 output, the O rounding (relative u, subnormal 2^-10 in V8 units)."""
    q, k, v = _qkv(heads_scale=(1.0, 8.0), seed=3)
    qq = quantized_qkv(q, k, v, scaling)
    a = 1 / math.sqrt(q.shape[-1])
    o = emulate_sdpa_fp8(qq, a, out).double()
    qd, kd = qq.q.double() * qq.descale_q, qq.k.double() * qq.descale_k
    vd = qq.v.double() * qq.descale_v * (1 if qq.out_factor is None else qq.out_factor)   # V in real units
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * a
    p = torch.exp(s - s.amax(-1, keepdim=True))
    denom = p.sum(-1, keepdim=True)
    exact = torch.einsum("bhqk,bkhd->bqhd", p / denom, vd)
    dp = U * p + 2.0 ** -10 / E4M3_MAX                                   # |P8 - P|
    bound = torch.einsum("bhqk,bkhd->bqhd", dp / denom, vd.abs())
    if out == "fp8":
        vscale = qq.descale_v * (1 if qq.out_factor is None else qq.out_factor)
        bound = bound + U * (exact.abs() + bound) + 2.0 ** -10 * vscale.double()
    err = (o - exact).abs()
    assert (err <= bound * (1 + 1e-4) + 1e-6).all()
    # end to end against the unquantised inputs: an error of the size FP8 has, not a broken kernel
    ref = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * a, -1)
    ref = torch.einsum("bhqk,bkhd->bqhd", ref, v.double())
    rel = ((o - ref).norm() / ref.norm()).item()
    assert 0 < rel < 8 * U


def test_attention_fp8_entry_point_uses_emulation_on_cpu():
    from nodes.common.attention import attention, attention_fp8
    q, k, v = _qkv(seed=5)
    y = attention_fp8(q, k, v)
    assert y.shape == q.shape and y.dtype == q.dtype
    rel = ((y - attention(q, k, v)).norm() / attention(q, k, v).norm()).item()
    assert 0 < rel < 8 * U
    with pytest.raises(ValueError, match="scaling"):
        attention_fp8(q, k, v, scaling="channel")


# ------------------------------------------------------------------ FP8 KV cache
@pytest.mark.parametrize("rope_mode,sink", [("absolute", 0), ("relative", 1)])
@pytest.mark.parametrize("device_rows", [False, True])
def test_fp8_kv_cache_roundtrip(rope_mode, sink, device_rows):
    """Every block written to an FP8 cache reads back as the float32 cache's rows quantised per (token, head)."""
    kw = dict(sink_frames=sink, window_frames=4, rope_mode=rope_mode)
    ref = SelfKVCache(2, 3, 16, 5, **kw)
    c8 = SelfKVCache(2, 3, 16, 5, dtype=E4M3, read_dtype=torch.float32, **kw)
    assert c8.k.dtype == E4M3 and c8.k_scale.shape == c8.k.shape[:-1] + (1,)
    assert c8.k.nbytes + c8.k_scale.nbytes == ref.k.numel() * (1 + 4 / 16)   # 1 byte + a float32 per 16 values
    g = torch.Generator().manual_seed(0)
    for start in range(0, 10, 2):
        plan = ref.plan(start, 2)
        for layer in range(2):
            k, v = (torch.randn(1, 10, 3, 16, generator=g) * 3 for _ in range(2))
            for c in (ref, c8):
                c.write(layer, plan, k, v, c.device_rows(plan) if device_rows else None)
            rk, rv = ref.keys_values(layer, plan)
            k8, v8 = c8.keys_values(layer, plan)
            assert k8.dtype == torch.float32 and k8.shape == rk.shape
            for mine, want in ((k8, rk), (v8, rv)):
                w8, ws = quantize_rows(want)
                assert torch.equal(mine, dequantize(w8, ws))            # bit-exact with an independent quantisation
                assert ((mine - want).abs() <= _quant_err(want, ws)).all()
    ck, cv = c8.chronological(1, 10)
    rk, rv = ref.chronological(1, 10)
    assert ((ck - rk).abs() <= _quant_err(rk, amax_scale(rk, -1))).all()


def test_fp8_cache_buffers_include_scales():
    c8 = SelfKVCache(1, 2, 16, 3, window_frames=2, dtype=E4M3)
    assert set(c8.buffers()) == {"k", "v", "k_scale", "v_scale"}
    assert set(SelfKVCache(1, 2, 16, 3, window_frames=2).buffers()) == {"k", "v"}


@pytest.mark.parametrize("scaling", ["tensor", "head"])
def test_requantize_from_an_fp8_cache(scaling):
    """K/V stored per (token, head) are rescaled to the attention's scale: one more rounding of the stored
    values, and the same scores/outputs as quantising the dequantised rows."""
    from nodes.common.fp8_attention import requantize_qkv
    q, k, v = _qkv(heads_scale=(1.0, 2.0 ** 5), lk=12, seed=7)
    (k8, ks), (v8, vs) = quantize_rows(k), quantize_rows(v)
    kd, vd = dequantize(k8, ks), dequantize(v8, vs)                      # what the cache holds, in real units
    qq = quantized_qkv(q, k8, v8, scaling, lambda q_, k_, v_, s_: requantize_qkv(q_, k_, ks, v_, vs, s_))
    if scaling == "tensor":
        sk, sv = qq.descale_k, qq.descale_v
        assert torch.equal(sk.flatten(), ks.amax().flatten()) and torch.equal(sv.flatten(), vs.amax().flatten())
        k_back, v_back = qq.k.float() * sk, qq.v.float() * sv
    else:
        b = ks.amax(dim=(0, 1, 3), keepdim=True)
        sk, sv = b, qq.out_factor
        k_back, v_back = qq.k.float() * b, qq.v.float() * qq.out_factor
    assert ((k_back - kd).abs() <= _quant_err(kd, sk)).all()
    assert ((v_back - vd).abs() <= _quant_err(vd, sv)).all()
    from nodes.common.attention import attention, attention_fp8
    y = attention_fp8(q, k8, v8, scaling=scaling, kv_scales=(ks, vs))
    ref = attention(q, k, v)
    assert 0 < ((y - ref).norm() / ref.norm()).item() < 8 * U


# ------------------------------------------------------------------ tensor-scaled FP8 KV cache (FP8 attention reads it)
def test_rescale_fp8_in_place_is_exact_for_one_and_rounds_otherwise():
    from nodes.common.fp8_kernels import rescale_fp8_
    x8 = quantize(_spread(4, 64, seed=3), torch.tensor(2.0 ** -6))
    before = x8.clone()
    rescale_fp8_(x8, torch.tensor([1.0]))
    assert torch.equal(x8.view(torch.uint8), before.view(torch.uint8))
    rescale_fp8_(x8, torch.tensor([0.3]))
    want = (before.float() * 0.3).to(E4M3)                     # the e4m3 value nearest to x * 0.3
    assert torch.equal(x8.view(torch.uint8), want.view(torch.uint8))
    with pytest.raises(ValueError, match="contiguous float8"):
        rescale_fp8_(torch.zeros(3), torch.tensor([1.0]))


@pytest.mark.parametrize("rope_mode,sink", [("absolute", 0), ("relative", 1)])
def test_tensor_scaled_fp8_cache_keeps_a_running_scale(rope_mode, sink):
    """One scale per layer = max amax/448 of everything written so far (recomputed here from the float inputs);
    rows stored before the scale grew were rounded twice (at their old scale, then the new one); a write that
    does not raise the scale leaves every earlier row bit-identical; the attended rows dequantise to the float
    cache's within those roundings."""
    kw = dict(sink_frames=sink, window_frames=4, rope_mode=rope_mode)
    ref = SelfKVCache(2, 3, 16, 5, **kw)
    c8 = SelfKVCache(2, 3, 16, 5, dtype=E4M3, fp8_scaling="tensor", **kw)
    assert c8.k_scale.shape == (2, 1, 1, 1, 1) and c8.tensor_scaled
    g = torch.Generator().manual_seed(1)
    amax = {0: torch.tensor(0.0), 1: torch.tensor(0.0)}
    loud = (1.0, 4.0, 0.5, 0.25, 8.0)                     # block 2 raises the scale, blocks 3 and 4 do not, 5 does
    for b, start in enumerate(range(0, 10, 2)):
        plan = ref.plan(start, 2)
        for layer in range(2):
            k = torch.randn(1, 10, 3, 16, generator=g) * loud[b]
            v = torch.randn(1, 10, 3, 16, generator=g) * loud[b]
            kept = c8.k[layer].clone()
            grew = k.abs().amax() > amax[layer]
            amax[layer] = torch.maximum(amax[layer], k.abs().amax())
            for c in (ref, c8):
                c.write(layer, plan, k, v, c.device_rows(plan))
            s = amax[layer] / E4M3_MAX
            if rope_mode == "absolute":                        # (the relative mode's sink rewrite adds its own max)
                assert torch.allclose(c8.k_scale[layer].flatten(), s.reshape(1), rtol=1e-6)
            if not grew and rope_mode == "absolute":
                others = torch.ones(c8.k.shape[2], dtype=torch.bool)
                others[c8.device_rows(plan).index] = False
                assert torch.equal(kept[:, others].view(torch.uint8), c8.k[layer][:, others].view(torch.uint8))
            rk, rv = ref.keys_values(layer, plan)
            k8, v8 = c8.keys_values(layer, plan)
            k8s, ks, _, vs = c8.quantized_values(layer, plan)
            assert ks.shape == (1, 1, 1, 1) and torch.equal(k8s.float() * ks, k8)
            for mine, want, sc in ((k8, rk, c8.k_scale[layer]), (v8, rv, c8.v_scale[layer])):
                assert ((mine - want).abs() <= 2.1 * roundtrip_bound(want, sc) + F32 * want.abs()).all()
    ck, _ = c8.chronological(1, 10)
    rk, _ = ref.chronological(1, 10)
    assert ((ck - rk).abs() <= 2.1 * roundtrip_bound(rk, c8.k_scale[1]) + F32 * rk.abs()).all()
    assert {"k", "v", "k_scale", "v_scale"} <= set(c8.buffers())
    with pytest.raises(ValueError, match="fp8_scaling"):
        SelfKVCache(1, 1, 16, 1, window_frames=2, dtype=E4M3, fp8_scaling="channel")


def test_fp8_attention_reads_a_tensor_scaled_cache_as_stored():
    """Scalar cache scales go to the kernel as the K/V descales, the e4m3 rows untouched (no rescale pass)."""
    from nodes.common.fp8_attention import requantize_qkv
    q, k, v = _qkv(heads_scale=(1.0, 2.0 ** 3), lk=12, seed=2)
    sk, sv = amax_scale(k).reshape(1, 1, 1, 1), amax_scale(v).reshape(1, 1, 1, 1)
    k8, v8 = quantize(k, sk), quantize(v, sv)
    qq = quantized_qkv(q, k8, v8, "tensor", lambda q_, k_, v_, s_: requantize_qkv(q_, k_, sk, v_, sv, s_))
    assert qq.k is k8 and qq.v is v8 and torch.equal(qq.descale_k, sk) and torch.equal(qq.descale_v, sv)
    from nodes.common.attention import attention, attention_fp8
    y = attention_fp8(q, k8, v8, scaling="tensor", kv_scales=(sk, sv))
    ref = attention(q, k, v)
    assert 0 < ((y - ref).norm() / ref.norm()).item() < 8 * U


def test_fp8_attention_rows_are_the_kernel_output_for_the_o_projection():
    """as_rows: the e4m3 output and its scale as an Fp8Linear input; dequantised, exactly the plain FP8 output
    (before its cast to q's dtype), and through a linear within the FP8 linear's bound of the float product."""
    from nodes.common.attention import attention_fp8
    q, k, v = _qkv(heads_scale=(1.0, 2.0), lk=12, seed=5)
    rows = attention_fp8(q, k, v, as_rows=True)
    assert isinstance(rows, QuantizedRows) and rows.data.dtype == E4M3
    b, lq, h, d = q.shape
    assert rows.data.shape == (b * lq, h * d) and rows.scale.shape == (b * lq, 1) and rows.lead == (b, lq)
    from nodes.common.fp8_attention import emulate_sdpa_fp8, quantize_qkv
    plain = emulate_sdpa_fp8(quantized_qkv(q, k, v, "tensor", quantize_qkv), 1 / math.sqrt(d), "fp8")
    assert torch.equal(rows.data.float() * rows.scale, plain.reshape(b * lq, h * d))
    lin = torch.nn.Linear(h * d, 32)
    f8 = Fp8Linear.from_linear(lin)
    y = f8(rows)
    want = torch.nn.functional.linear(plain.reshape(b, lq, h * d), f8.dequantized_weight(), lin.bias)
    assert y.shape == (b, lq, 32) and ((y - want).norm() / want.norm()).item() < 1e-5
    with pytest.raises(ValueError, match="as_rows"):
        attention_fp8(q, k, v, scaling="head", as_rows=True)
