"""FP8 (e4m3) scaled-dot-product attention: cuDNN's ``sdpa_fp8`` on CUDA, a plain-torch emulation elsewhere.

Reached through ``nodes.common.attention.attention_fp8`` (attention.py stays the one entry point).
Tensors are [B, L, H, D] as everywhere in fd; cuDNN takes any strides, so the [B, H, L, D] view it
wants is described by strides and nothing is transposed in memory.

cuDNN's FP8 forward (Hopper): S = descale_q descale_k (Q8 K8^T) * attn_scale; P = softmax(S) goes
to e4m3 with ``scale_s`` (P <= 1, so scale_s = 448 and descale_s = 1/448); O8 = P8 V8 descale_s
descale_v scale_o, stored in e4m3 (or, where the build allows, bf16). Its descales are scalars, so
finer granularity has to be folded in around the kernel. ``SCALINGS``:

- ``tensor``: one amax scale each for Q, K and V. O8 = P V / s_v, so O = O8 s_v.
- ``head``: K and V get one scale per head (b_h, c_h). K's is folded into Q (Q~_h = Q_h b_h, then one
  scale for Q~: scores are unchanged), V's is undone on the output (O_h = O8_h c_h, an elementwise op
  that the dequantisation does anyway). Q itself stays per tensor: a per-head factor on the scores
  cannot be folded anywhere without a per-head descale.

Every scale is computed on the GPU from the tensors themselves (no host read), the cuDNN plan is built
once per shape/stride key and its workspace kept, and ``execute`` runs on the current stream: the call
is CUDA-graph capturable once its key has run eagerly (GraphCache's warmup does that).
``emulate_sdpa_fp8`` computes the same quantised formula in float32 (one tile: softmax taken against
the row max, P rounded to e4m3 before P V, the row sum from unrounded P): the CPU path and the
reference of the tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .fp8 import E4M3, E4M3_MAX, QuantizedRows, amax_scale, quantize

SCALINGS = ("tensor", "head")
OUTPUTS = ("fp8", "bf16")


@dataclass
class QuantizedQKV:
    """Q8/K8/V8 in [B, L, H, D] with the scalar descales cuDNN takes ([1,1,1,1] float32) and the per-head
    output factor (``head`` scaling; [1, 1, H, 1]) or None."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    descale_q: torch.Tensor
    descale_k: torch.Tensor
    descale_v: torch.Tensor
    out_factor: torch.Tensor | None


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: str = "tensor") -> tuple:
    """The QuantizedQKV fields as a plain tuple (what torch.compile returns best); see ``quantized_qkv``."""
    if scaling == "tensor":
        sq, sk, sv = amax_scale(q), amax_scale(k), amax_scale(v)
        one = lambda s: s.reshape(1, 1, 1, 1)  # noqa: E731
        return quantize(q, sq), quantize(k, sk), quantize(v, sv), one(sq), one(sk), one(sv), None
    if scaling == "head":
        b = amax_scale(k, (0, 1, 3))               # [1, 1, H, 1]
        c = amax_scale(v, (0, 1, 3))
        qt = q.float() * b
        sq = amax_scale(qt)
        ones = torch.ones(1, 1, 1, 1, device=q.device, dtype=torch.float32)
        return quantize(qt, sq), quantize(k, b), quantize(v, c), sq.reshape(1, 1, 1, 1), ones, ones, c
    raise ValueError(f"unknown FP8 attention scaling {scaling!r}; choose one of {SCALINGS}")


def quantized_qkv(q, k, v, scaling: str = "tensor", quant=quantize_qkv) -> QuantizedQKV:
    return QuantizedQKV(*quant(q, k, v, scaling))


def requantize_qkv(q, k8, ks, v8, vs, scaling: str = "tensor") -> tuple:
    """As ``quantize_qkv`` for K/V that are already e4m3 with one scale per (token, head) (an FP8 KV cache:
    ks, vs [B, L, H, 1]): the tensor's (or head's) amax scale is the max of those scales, so each row is only
    rescaled by s_row / S <= 1 and rounded again, one pass over one byte per value instead of dequantising to
    bf16 and quantising that. K/V with one scale each (a tensor-scaled cache, [1, 1, 1, 1]) go in as they are."""
    def rescale(x8, s, dims):
        if s.numel() == 1:                       # already at one scale (a tensor-scaled cache): as stored
            return x8, s.reshape(1, 1, 1, 1)
        big = s.amax() if dims is None else s.amax(dim=dims, keepdim=True)
        return quantize(x8.float() * (s / big), torch.ones_like(big)), big
    if scaling == "tensor":
        sq = amax_scale(q)
        (k2, sk), (v2, sv) = rescale(k8, ks, None), rescale(v8, vs, None)
        one = lambda s: s.reshape(1, 1, 1, 1)  # noqa: E731
        return quantize(q, sq), k2, v2, one(sq), one(sk), one(sv), None
    if scaling == "head":
        (k2, b), (v2, c) = rescale(k8, ks, (0, 1, 3)), rescale(v8, vs, (0, 1, 3))
        qt = q.float() * b
        sq = amax_scale(qt)
        ones = torch.ones(1, 1, 1, 1, device=q.device, dtype=torch.float32)
        return quantize(qt, sq), k2, v2, sq.reshape(1, 1, 1, 1), ones, ones, c
    raise ValueError(f"unknown FP8 attention scaling {scaling!r}; choose one of {SCALINGS}")


def _round_e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float()


def emulate_sdpa_fp8_units(qq: QuantizedQKV, attn_scale: float, out: str = "fp8") -> torch.Tensor:
    """The FP8 kernel's arithmetic in float32, O in V8 units (e4m3-rounded for an fp8 output: what the kernel
    stores, to be multiplied by descale_v); [B, Lq, H, D]."""
    q = qq.q.float() * qq.descale_q
    k = qq.k.float() * qq.descale_k
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * attn_scale
    p = torch.exp(s - s.amax(-1, keepdim=True))
    denom = p.sum(-1, keepdim=True)
    p8 = _round_e4m3(p * E4M3_MAX) / E4M3_MAX
    o = torch.einsum("bhqk,bkhd->bqhd", p8 / denom, qq.v.float())
    return _round_e4m3(o) if out == "fp8" else o                            # scale_o = 1 / descale_v


def emulate_sdpa_fp8(qq: QuantizedQKV, attn_scale: float, out: str = "fp8") -> torch.Tensor:
    """The FP8 kernel's arithmetic in float32 (reference and CPU path); returns O in float32 [B, Lq, H, D]."""
    o = emulate_sdpa_fp8_units(qq, attn_scale, out) * qq.descale_v
    return o if qq.out_factor is None else o * qq.out_factor


class CudnnFp8Attention:
    """cuDNN frontend ``sdpa_fp8`` graphs, one per (shapes, strides, output) key, each with its workspace.
    One instance per model (its plans are that model's shapes); not thread-safe, like the model."""

    def __init__(self, out: str = "fp8"):
        if out not in OUTPUTS:
            raise ValueError(f"FP8 attention output must be one of {OUTPUTS}, got {out!r}")
        self.out = out
        self._plans: dict[tuple, tuple] = {}
        self._handle = None
        self._cudnn = None

    def _lib(self):
        if self._cudnn is None:
            try:
                import cudnn  # nvidia-cudnn-frontend, optional: only FP8 attention needs it
            except ImportError as e:
                raise RuntimeError("FP8 attention needs the cuDNN frontend: pip install nvidia-cudnn-frontend "
                                   f"(import cudnn failed: {e})") from e
            self._cudnn = cudnn
            self._handle = cudnn.create_handle()
        return self._cudnn

    def _plan(self, qq: QuantizedQKV, o: torch.Tensor, attn_scale: float):
        key = (tuple(qq.q.shape), tuple(qq.k.shape), qq.q.stride(), qq.k.stride(), qq.v.stride(), o.stride(),
               o.dtype, attn_scale, qq.q.device)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        cudnn = self._lib()
        e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        out_t = e4m3 if o.dtype == E4M3 else cudnn.data_type.BFLOAT16
        g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=self._handle)

        def bhld(x):   # describe [B, L, H, D] memory as the [B, H, L, D] tensor cuDNN wants
            b, l, h, d = x.shape
            sb, sl, sh, sd = x.stride()
            return [b, h, l, d], [sb, sh, sl, sd]

        def tensor(x, dt):
            dims, strides = bhld(x)
            return g.tensor(dim=dims, stride=strides, data_type=dt)

        scalar = lambda: g.tensor(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)  # noqa: E731
        tq, tk, tv = tensor(qq.q, e4m3), tensor(qq.k, e4m3), tensor(qq.v, e4m3)
        tdq, tdk, tdv, tds, tss, tso = (scalar() for _ in range(6))
        to, _, tas, tao = g.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=tdq, descale_k=tdk, descale_v=tdv,
                                     descale_s=tds, scale_s=tss, scale_o=tso, generate_stats=False,
                                     attn_scale=attn_scale, use_causal_mask=False)
        dims, strides = bhld(o)
        to.set_output(True).set_dim(dims).set_stride(strides).set_data_type(out_t)
        for a in (tas, tao):
            a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        dev = qq.q.device
        consts = {"ws": torch.empty(g.get_workspace_size(), device=dev, dtype=torch.uint8),
                  "descale_s": torch.full((1, 1, 1, 1), 1.0 / E4M3_MAX, device=dev),
                  "scale_s": torch.full((1, 1, 1, 1), E4M3_MAX, device=dev),
                  "amax_s": torch.empty(1, 1, 1, 1, device=dev), "amax_o": torch.empty(1, 1, 1, 1, device=dev)}
        plan = self._plans[key] = (g, (tq, tk, tv, tdq, tdk, tdv, tds, tss, tso, to, tas, tao), consts)
        return plan

    def __call__(self, qq: QuantizedQKV, attn_scale: float) -> torch.Tensor:
        """O in float32 [B, Lq, H, D] (dequantised)."""
        o, scale_o = self.raw(qq, attn_scale)
        out = o.float() / scale_o
        return out if qq.out_factor is None else out * qq.out_factor

    def raw(self, qq: QuantizedQKV, attn_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(O as the kernel wrote it, e4m3 or bf16 [B, Lq, H, D]; scale_o: O = O_raw / scale_o, before out_factor)."""
        b, lq, h, _ = qq.q.shape
        o = torch.empty(b, lq, h, qq.v.shape[-1], device=qq.q.device,
                        dtype=E4M3 if self.out == "fp8" else torch.bfloat16)
        g, (tq, tk, tv, tdq, tdk, tdv, tds, tss, tso, to, tas, tao), c = self._plan(qq, o, attn_scale)
        # fp8 out: scale_o = 1 / descale_v keeps O8 = P V8 within +-448; bf16 out: O = P V8 descale_v as is
        scale_o = 1.0 / qq.descale_v if self.out == "fp8" else torch.ones_like(qq.descale_v)
        cudnn = self._cudnn
        cudnn.set_stream(handle=self._handle, stream=torch.cuda.current_stream(qq.q.device).cuda_stream)
        g.execute({tq: qq.q, tk: qq.k, tv: qq.v, tdq: qq.descale_q, tdk: qq.descale_k, tdv: qq.descale_v,
                   tds: c["descale_s"], tss: c["scale_s"], tso: scale_o, to: o, tas: c["amax_s"], tao: c["amax_o"]},
                  c["ws"], handle=self._handle)
        return o, scale_o


def _quantized_inputs(q, k, v, scale, scaling, quant, kv_scales) -> tuple[QuantizedQKV, float]:
    """Q/K/V in e4m3 for the kernel (K/V from an FP8 cache when ``kv_scales``), and the softmax scale."""
    attn_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if kv_scales is None:
        return quantized_qkv(q, k, v, scaling, quant or quantize_qkv), attn_scale
    return QuantizedQKV(*(quant or requantize_qkv)(q, k, kv_scales[0], v, kv_scales[1], scaling)), attn_scale


def fp8_attention(q, k, v, *, scale: float | None = None, scaling: str = "tensor",
                  runner: CudnnFp8Attention | None = None, out: str = "fp8", quant=None,
                  kv_scales: tuple | None = None) -> torch.Tensor:
    """softmax(q k^T scale) v with Q/K/V (and P, and O unless out='bf16') in e4m3; [B, L, H, D] in and out,
    out in q's dtype. CUDA needs a ``runner`` (it holds the cuDNN plans); without one the float32
    emulation runs (CPU, tests). ``kv_scales`` = (ks, vs): k and v are already e4m3 with those per-(token,
    head) scales (an FP8 KV cache). ``quant``: quantize_qkv (requantize_qkv with kv_scales) or a compiled copy."""
    qq, attn_scale = _quantized_inputs(q, k, v, scale, scaling, quant, kv_scales)
    if runner is None:
        return emulate_sdpa_fp8(qq, attn_scale, out).to(q.dtype)
    if runner.out != out:
        raise ValueError(f"this runner writes {runner.out} outputs, asked for {out}")
    return runner(qq, attn_scale).to(q.dtype)


def fp8_attention_rows(q, k, v, *, scale: float | None = None, runner: CudnnFp8Attention | None = None,
                       quant=None, kv_scales: tuple | None = None) -> QuantizedRows:
    """``fp8_attention`` (tensor scaling, e4m3 output) handed on as the kernel wrote it: the e4m3 output
    [B*Lq, H*D] with its one scale as a per-row scale, the input an Fp8Linear (the o projection) takes.
    Saves the dequantise + per-token requantise between them, and one rounding."""
    qq, attn_scale = _quantized_inputs(q, k, v, scale, "tensor", quant, kv_scales)
    if runner is None:
        o8 = emulate_sdpa_fp8_units(qq, attn_scale, "fp8").to(E4M3)
    elif runner.out != "fp8":
        raise ValueError(f"fp8_attention_rows needs a runner with e4m3 output, this one writes {runner.out}")
    else:
        o8, _ = runner.raw(qq, attn_scale)          # O = O8 * descale_v (scale_o = 1 / descale_v)
    b, lq, h, d = o8.shape
    rows = b * lq
    return QuantizedRows(o8.reshape(rows, h * d), qq.descale_v.reshape(1, 1).expand(rows, 1).contiguous(), (b, lq))
