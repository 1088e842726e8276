"""Wan 2.1 diffusion transformer, bidirectional and causal (KV-cached) in one module.

Parameter names are upstream's (wan/modules/model.py), so Wan-AI checkpoints and
Self-Forcing / Causal-Forcing generators load with strict=True. Numerics follow
upstream's mixed precision: the timestep sinusoid in float64, time embedding,
AdaLN modulation, gates and the head in float32, the residual stream in float32
(as official Wan's autocast leaves it); projections, attention and FFN run in the
weights' dtype (bf16 on GPU). The causal path is Self-Forcing's CausalWanModel:
per-frame timesteps, self-attention over [cached K/V + the block's own], cross-
attention K/V computed once per prompt.

Reading order, as gpt-fast's model file: ``Block.forward(x, cond, rope, ctx)``,
where ``cond`` is the per-frame AdaLN modulation, ``rope`` the (cos, sin) rows of
the tokens and ``ctx`` the ``CallContext`` every block of one call shares (the
prompt's cross-attention K/V, the self-attention cache and where this call's rows
go, the context-parallel sharding). The self-attention module owns the cache
protocol: it writes its layer's rows and reads the attended window.

Speed (CUDA): the elementwise stages between the matmuls (AdaLN modulation, qk
RMS-norm + RoPE, gated residual adds) are plain functions collected in
``Kernels`` so that ``WanDiT.compile_elementwise()`` can hand them to
torch.compile (one compile per shape, shared by all layers: short cold start);
RoPE tables are built on the device; the causal cache is written through a
device row index. nodes/wan/causal.py wraps the causal call as the causal-model
contract and replays it as CUDA graphs keyed by the attended length.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataclasses import dataclass

from nodes.common.attention import attention, attention_fp8
from nodes.common.fp8 import Fp8Linear, QuantizedRows, dequantize, fp8_linears, quantize_rows
from nodes.common.fp8_attention import quantize_qkv, requantize_qkv
from nodes.common.fp8_kernels import gelu_quantize_rows, gelu_quantize_rows_formula
from nodes.common.kv_cache import BlockPlan, DeviceRows, SelfKVCache, quantize_running
from nodes.common.rope import RopeTable, apply_rope
from nodes.common.session_rows import SessionRows
from nodes.common.sharding import TokenSharding
from nodes.common.sharding import for_group as context_parallel_for

from .config import WanConfig

CAMERA_CHANNELS = 6 * 8 * 8  # LingBot Plücker rays (o, d) folded 8x8 space-to-depth: 384
CLIP_DIM = 1280  # CLIP ViT-H penultimate width, upstream's MLPProj(1280, dim); WanConfig.image_dim carries it


def sinusoidal_embedding(dim: int, t: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[N] timesteps -> [N, dim] = cat(cos, sin); t may be fractional. float64 as Wan-AI / Self-Forcing
    (10000^(-k/half)); float32 as diffusers / FastVideo (exp(-ln(10000) k / half), t.float() * freqs)."""
    half = dim // 2
    k = torch.arange(half, dtype=dtype, device=t.device)
    if dtype == torch.float64:
        freqs = torch.pow(10000, -k / half)
    else:
        freqs = torch.exp(-math.log(10000) * k / half)
    ang = torch.outer(t.to(dtype), freqs)
    return torch.cat([ang.cos(), ang.sin()], dim=1)


def _linear32(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())


def _modulate(x, shift, scale, fm: int, eps: float, dtype: torch.dtype):
    """AdaLN: LayerNorm(x) * (1 + scale) + shift per frame, cast to the matmul dtype."""
    h = F.layer_norm(x, (x.shape[-1],), eps=eps).unflatten(1, (fm, -1))
    return (h * (1 + scale) + shift).flatten(1, 2).to(dtype)


def _gated_add(x, y, gate, fm: int):
    """Residual x + y * gate (per frame), in float32."""
    return x + (y.float().unflatten(1, (fm, -1)) * gate).flatten(1, 2)


def _norm_rope(x, weight, eps: float, heads: int, cos, sin):
    """q or k: optional RMS qk-norm (upstream WanRMSNorm), split heads, rotate."""
    if weight is not None:
        x = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x) * weight
    return apply_rope(x.unflatten(-1, (heads, -1)), cos, sin)


def _ln_cast(x, weight, bias, eps: float, dtype: torch.dtype):
    """Cross-attention input: float32 affine LayerNorm (or none) cast to the matmul dtype."""
    if weight is not None:
        x = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), None if bias is None else bias.float(), eps)
    return x.to(dtype)


def _add_float(x, y):
    return x + y.float()


def _modulate_quant(x, shift, scale, fm: int, eps: float, dtype: torch.dtype):
    """AdaLN and the per-token e4m3 quantisation of its output (FP8 linears) in one pass: [B*L, dim] + [B*L, 1]."""
    h = _modulate(x, shift, scale, fm, eps, dtype)
    return quantize_rows(h.reshape(-1, h.shape[-1]))


def _ln_quant(x, weight, bias, eps: float, dtype: torch.dtype):
    """The cross-attention input (``_ln_cast``) quantised per token in the same pass."""
    h = _ln_cast(x, weight, bias, eps, dtype)
    return quantize_rows(h.reshape(-1, h.shape[-1]))




class Kernels:
    """The DiT's elementwise stages: eager, or torch.compile'd (``compile=True``). The FP8 quantisers
    (per-token activations, attention Q/K/V) are among them: amax + scale + cast fuse into one kernel.
    quant_qkv / requant_qkv / dequant see the attended length, so they compile once per length: 7 for a
    21-frame window of 3-frame blocks, within torch's recompile limit (8); past it torch runs them eagerly."""

    NAMES = ("modulate", "gated_add", "norm_rope", "ln_cast", "add_float", "quant_rows", "quant_qkv", "gelu_quant",
             "dequant", "requant_qkv", "modulate_quant", "ln_quant", "quant_running")

    def __init__(self, compile: bool = False, mode: str | None = None):
        self.compiled = compile
        fns = (_modulate, _gated_add, _norm_rope, _ln_cast, _add_float, quantize_rows, quantize_qkv,
               gelu_quantize_rows_formula, dequantize, requantize_qkv, _modulate_quant, _ln_quant, quantize_running)
        for name, fn in zip(self.NAMES, fns):
            setattr(self, name, torch.compile(fn, dynamic=False, fullgraph=True, mode=mode) if compile else fn)
        # the FFN middle (GELU + per-token quantisation, 8,960 wide) has a Triton kernel on CUDA that reads each
        # row once (nodes/common/fp8_kernels.py); the formula above is its fallback
        formula = self.gelu_quant
        self.gelu_quant = lambda x: gelu_quantize_rows(x, formula)


EAGER = Kernels()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


class FP32LayerNorm(nn.LayerNorm):
    """Affine LayerNorm evaluated in float32 (upstream WanLayerNorm / autocast)."""

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


@dataclass
class CrossCache:
    """Per-layer cross-attention K/V of one prompt ([B, L, H, D] each).

    Built once per prompt by WanDiT.prepare_cross and reused by every call;
    swapping it for another prompt leaves the self-attention cache alone.
    k_img / v_img are the I2V image-token K/V (None for T2V).
    """
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    k_img: list[torch.Tensor] | None = None
    v_img: list[torch.Tensor] | None = None


@dataclass
class CallContext:
    """What every block of one forward call shares."""
    cross: CrossCache
    backend: str = "auto"
    kernels: "Kernels" = None
    cache: SelfKVCache | None = None          # causal calls: the session's self-attention cache
    plan: BlockPlan | None = None             # where this call's rows go in it
    rows: DeviceRows | None = None            # the same, as device tensors (captured calls)
    cp: TokenSharding | None = None           # context parallelism: this rank's tokens
    camera: torch.Tensor | None = None        # LingBot camera tokens [B, L, dim] (control_type 'cam'), or None
    fp8_attention: "Fp8Attention | None" = None  # self-attention in FP8 (WanDiT.use_fp8_attention), else None
    sessions: SessionRows | None = None       # several sessions batched: each row's own cache and position


@dataclass
class Fp8Attention:
    """How the self-attention runs in FP8: the scaling (nodes/common/fp8_attention.py SCALINGS), the output
    type, and the cuDNN plans (``runner``; None runs the float32 emulation: CPU tests)."""
    scaling: str = "tensor"
    out: str = "fp8"
    runner: object = None

    @property
    def gives_rows(self) -> bool:
        """Whether the output can go to an Fp8Linear as the e4m3 the kernel wrote (tensor scales, e4m3 out)."""
        return self.scaling == "tensor" and self.out == "fp8"

    def __call__(self, q, k, v, kernels: "Kernels", kv_scales=None, as_rows: bool = False):
        return attention_fp8(q, k, v, scaling=self.scaling, runner=self.runner, out=self.out, kv_scales=kv_scales,
                             quant=kernels.quant_qkv if kv_scales is None else kernels.requant_qkv, as_rows=as_rows)


class Projections(nn.Module):
    """q/k/v/o projections with optional RMS qk-norm (upstream parameter names)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float, layer: int):
        super().__init__()
        self.num_heads, self.eps, self.layer = num_heads, eps, layer
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        norm = (lambda: RMSNorm(dim, eps)) if qk_norm else nn.Identity
        self.norm_q, self.norm_k = norm(), norm()

    def heads(self, x):
        return x.unflatten(-1, (self.num_heads, -1))


class SelfAttention(Projections):
    """Self-attention over [cached window + this call's tokens]; the cache protocol lives here."""

    def forward(self, h, rope, ctx: CallContext):
        kern = ctx.kernels
        if isinstance(self.q, Fp8Linear) and not isinstance(h, QuantizedRows):   # quantise q, k and v's input once
            h = QuantizedRows.of(h, kern.quant_rows)
        q = kern.norm_rope(self.q(h), _norm_weight(self.norm_q), self.eps, self.num_heads, *rope)
        k = kern.norm_rope(self.k(h), _norm_weight(self.norm_k), self.eps, self.num_heads, *rope)
        v = self.heads(self.v(h))
        fa = ctx.fp8_attention
        # e4m3 attention output straight into an FP8 o projection (no dequantise + requantise)
        as_rows = fa is not None and fa.gives_rows and isinstance(self.o, Fp8Linear)
        if ctx.cp is not None:  # context parallel (nodes/common/sharding.py): cache + cross-rank attention
            y = ctx.cp.self_attention(q, k, v, self.layer, ctx.cache, ctx.plan, ctx.rows, ctx.backend)
        elif ctx.sessions is not None:   # each session's rows through the very call it makes alone
            y = ctx.sessions.self_attention(
                q, k, v, lambda qs, ks, vs, part: self.attend(qs, ks, vs, part.cache, part.plan, part.device_rows,
                                                               ctx, as_rows))
        else:
            y = self.attend(q, k, v, ctx.cache, ctx.plan, ctx.rows, ctx, as_rows)
        return self.o(y if isinstance(y, QuantizedRows) else y.flatten(2))

    def attend(self, q, k, v, cache: SelfKVCache | None, plan, rows, ctx: CallContext, as_rows: bool):
        """Write this call's K/V into ``cache`` (if any) and attend to the window: [B, L, H, D], or the FP8
        attention's e4m3 output as QuantizedRows (``as_rows``)."""
        kern, fa = ctx.kernels, ctx.fp8_attention
        if cache is not None:
            cache.write(self.layer, plan, k, v, rows)
        if fa is not None and getattr(cache, "fp8", False):
            # FP8 cache into FP8 attention: the stored rows are read as stored or rescaled, never dequantised
            k8, ks, v8, vs = cache.quantized_values(self.layer, plan, rows)
            return fa(q, k8, v8, kern, kv_scales=(ks, vs), as_rows=as_rows)
        if cache is not None:
            k, v = cache.keys_values(self.layer, plan, rows)
        return attention(q, k, v, ctx.backend) if fa is None else fa(q, k, v, kern, as_rows=as_rows)


class CrossAttention(Projections):
    """Attention to the prompt (and, I2V, the image tokens) through K/V prepared once per prompt."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float, layer: int, image_kv: bool = False):
        super().__init__(dim, num_heads, qk_norm, eps, layer)
        if image_kv:
            norm = (lambda: RMSNorm(dim, eps)) if qk_norm else nn.Identity
            self.k_img, self.v_img, self.norm_k_img = nn.Linear(dim, dim), nn.Linear(dim, dim), norm()

    def kv(self, x, image: bool = False):
        if image:
            return self.heads(self.norm_k_img(self.k_img(x))), self.heads(self.v_img(x))
        return self.heads(self.norm_k(self.k(x))), self.heads(self.v(x))

    def forward(self, h, ctx: CallContext):
        q, i, cross = self.heads(self.norm_q(self.q(h))), self.layer, ctx.cross
        y = attention(q, cross.k[i], cross.v[i], ctx.backend)
        if cross.k_img is not None:
            y = y + attention(q, cross.k_img[i], cross.v_img[i], ctx.backend)
        return self.o(y.flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: WanConfig, layer: int):
        super().__init__()
        d = cfg.dim
        self.dim, self.eps = d, cfg.eps
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.qk_norm, cfg.eps, layer)
        self.norm3 = FP32LayerNorm(d, eps=cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.qk_norm, cfg.eps, layer, cfg.model_type == "i2v")
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)
        if cfg.control_type == "cam":  # LingBot-World: camera injector + scale/shift after self-attention
            self.cam_injector_layer1, self.cam_injector_layer2 = nn.Linear(d, d), nn.Linear(d, d)
            self.cam_scale_layer, self.cam_shift_layer = nn.Linear(d, d), nn.Linear(d, d)

    def inject_camera(self, x, c):
        """x [B, L, dim] float32, camera tokens c [B, L, dim]: x * (1 + scale(h)) + shift(h),
        h = c + MLP(c) (not gated by the timestep modulation)."""
        h = self.cam_injector_layer2(F.silu(self.cam_injector_layer1(c))) + c
        return (1 + self.cam_scale_layer(h).float()) * x + self.cam_shift_layer(h).float()

    def forward(self, x, cond, rope, ctx: CallContext):
        """x [B, L, dim] float32 residual; cond [B, Fm, 6, dim] float32 AdaLN terms (Fm = 1 or frames)."""
        fm, wd, eps, kern = cond.shape[1], self.cross_attn.k.weight.dtype, self.eps, ctx.kernels
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float().unsqueeze(1) + cond).unsqueeze(3).unbind(2)
        h = _in_rows(kern, self.self_attn.q, x, kern.modulate, kern.modulate_quant, shift1, scale1, fm, eps, wd)
        x = kern.gated_add(x, self.self_attn(h, rope, ctx), gate1, fm)
        if ctx.camera is not None:
            x = self.inject_camera(x, ctx.camera)
        ln = (self.norm3.weight, self.norm3.bias, self.norm3.eps) if isinstance(self.norm3, FP32LayerNorm) \
            else (None, None, eps)
        h = _in_rows(kern, self.cross_attn.q, x, kern.ln_cast, kern.ln_quant, *ln, wd)
        x = kern.add_float(x, self.cross_attn(h, ctx))
        h = _in_rows(kern, self.ffn[0], x, kern.modulate, kern.modulate_quant, shift2, scale2, fm, eps, wd)
        return kern.gated_add(x, self._ffn(h, kern), gate2, fm)

    def _ffn(self, h, kern):
        up, _, down = self.ffn
        if isinstance(down, Fp8Linear):   # GELU fused into the down projection's input quantisation
            return down(QuantizedRows.of(up(h), kern.gelu_quant))
        return self.ffn(h)


def _in_rows(kern, linear, x, plain, quantising, *args):
    """The input of ``linear`` from x: ``plain(x, *args)``, or for an Fp8Linear the same values quantised per token
    in the same kernel (``quantising``: plain + quantize_rows), as the QuantizedRows it takes."""
    if isinstance(linear, Fp8Linear):
        x8, s = quantising(x, *args)
        return QuantizedRows(x8, s, tuple(x.shape[:-1]))
    return plain(x, *args)


def _norm_weight(norm: nn.Module):
    return norm.weight if isinstance(norm, RMSNorm) else None


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.dim, self.eps = cfg.dim, cfg.eps
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        """x [B, L, dim]; e [B, Fm, dim] float32 -> [B, L, prod(patch) * out_dim] float32."""
        shift, scale = (self.modulation.float().unsqueeze(1) + e.unsqueeze(2)).unsqueeze(3).unbind(2)
        h = F.layer_norm(x.float(), (self.dim,), eps=self.eps).unflatten(1, (e.shape[1], -1))
        return _linear32(self.head, (h * (1 + scale) + shift).flatten(1, 2))


class MLPProj(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))

    def forward(self, x):
        return self.proj(x)


class WanDiT(nn.Module):
    """Wan 2.1 DiT. `backend` (an attention.BACKENDS name) may be set after construction."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg, self.backend = cfg, "auto"
        self.parallel = None  # engine.parallel.ParallelGroup: context parallelism when it has > 1 rank
        self.kernels = EAGER
        self.fp8_attention: Fp8Attention | None = None   # use_fp8_attention() sets it
        self.rope_table = RopeTable(cfg.head_dim, size=16)   # served batches mix positions (up to 8 sessions)
        d, p = cfg.dim, cfg.patch_size
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=p, stride=p)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.model_type == "i2v":
            self.img_emb = MLPProj(cfg.image_dim, d)
        if cfg.control_type == "cam":  # LingBot-World: 6 Plücker channels x 8x8 space-to-depth per patch
            self.patch_embedding_wancamctrl = nn.Linear(CAMERA_CHANNELS * math.prod(p), d)
            self.c2ws_hidden_states_layer1, self.c2ws_hidden_states_layer2 = nn.Linear(d, d), nn.Linear(d, d)

    def embed_camera(self, camera: torch.Tensor) -> torch.Tensor:
        """Plücker tensor [B, 384, F, H, W] (nodes/lingbot/plucker.py) -> camera tokens [B, F*h*w, dim]:
        each patch's (channel, t, y, x) values, channel-major, through the camera patch embedding and
        its residual MLP."""
        if not hasattr(self, "patch_embedding_wancamctrl"):
            raise ValueError("a camera input needs a model with camera layers (control_type 'cam')")
        b, c, f, h, w = camera.shape
        pt, ph, pw = self.cfg.patch_size
        x = camera.to(self.dtype).reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (f // pt) * (h // ph) * (w // pw), c * pt * ph * pw)
        e = self.patch_embedding_wancamctrl(x)
        return e + self.c2ws_hidden_states_layer2(F.silu(self.c2ws_hidden_states_layer1(e)))

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def compile_elementwise(self, enabled: bool = True, mode: str | None = None) -> "WanDiT":
        """Run the elementwise stages through torch.compile (CUDA; each distinct shape
        compiles once on first use, shared by all layers)."""
        self.kernels = Kernels(compile=True, mode=mode) if enabled else EAGER
        self._share_quantiser()
        return self

    # FP8 linears of the transformer blocks: the token-count matmuls of every call. Left in their dtype: the
    # cross-attention k/v (run once per prompt), the time embedding/projection and head (float32, a few rows
    # or upstream's float32 numerics), the patch and text embeddings, LingBot's camera layers.
    FP8_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o",
                   "ffn.0", "ffn.2")

    def use_fp8_linears(self) -> int:
        """Quantise the blocks' FP8_LINEARS to e4m3 once (per output channel; in place, weights freed);
        returns how many layers changed."""
        n = sum(fp8_linears(blk, self.FP8_LINEARS) for blk in self.blocks)
        self._share_quantiser()
        return n

    def use_fp8_attention(self, scaling: str = "tensor", out: str = "fp8", runner=None) -> "WanDiT":
        """Self-attention in FP8 (cross-attention over the prompt's 512 tokens stays in the model's dtype:
        ~2 % of the attention FLOPs, and the prompt's conditioning is where precision is cheapest to keep)."""
        self.fp8_attention = Fp8Attention(scaling, out, runner)
        return self

    def _share_quantiser(self) -> None:
        for m in self.modules():
            if isinstance(m, Fp8Linear):
                m.quant = self.kernels.quant_rows

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] (one per sample) or [B, F] (per frame) -> e [B, Fm, dim], e0 [B, Fm, 6, dim] (float32)."""
        t = t.reshape(t.shape[0], -1)
        s = sinusoidal_embedding(self.cfg.freq_dim, t.flatten(), getattr(torch, self.cfg.sinusoid_dtype)).float()
        e = _linear32(self.time_embedding[2], F.silu(_linear32(self.time_embedding[0], s)))
        e0 = _linear32(self.time_projection[1], F.silu(e))
        return e.unflatten(0, t.shape), e0.unflatten(0, t.shape).unflatten(-1, (6, self.cfg.dim))

    def prepare_cross(self, context, clip_fea: torch.Tensor | None = None) -> CrossCache:
        """Cross-attention K/V for a prompt: context [B, L<=text_len, text_dim] or a list of [L_b, text_dim].

        Zero-pads to text_len and keeps every row (no mask, as upstream: padding rows
        attend as text_embedding(0)). I2V also needs clip_fea [B, 257, 1280].
        """
        if self.cfg.model_type == "i2v" and clip_fea is None:
            raise ValueError("an i2v model needs clip_fea")
        rows = list(context)
        if any(r.shape[0] > self.cfg.text_len for r in rows):
            raise ValueError(f"context longer than text_len={self.cfg.text_len}")
        ctx = torch.stack([F.pad(r, (0, 0, 0, self.cfg.text_len - r.shape[0])) for r in rows])
        c = self.text_embedding(ctx.to(self.dtype))
        kv = [blk.cross_attn.kv(c) for blk in self.blocks]
        cross = CrossCache([k for k, _ in kv], [v for _, v in kv])
        if self.cfg.model_type == "i2v":
            img = self.img_emb(clip_fea.to(self.dtype))
            kv = [blk.cross_attn.kv(img, image=True) for blk in self.blocks]
            cross.k_img, cross.v_img = [k for k, _ in kv], [v for _, v in kv]
        return cross

    def _run(self, x, t, cross, frame_start=0, cache=None, rope=None, plan=None, rows=None, camera=None,
             sessions: SessionRows | None = None):
        """x [B, C, F, H, W] -> [B, out_dim, F, H, W] float32. A captured caller passes the
        block's rope (cos, sin), plan and device rows in; otherwise they are looked up here.
        ``sessions``: several sessions' blocks in one batch (each its own cache, position and
        per-row rope [B, L, 1, D/2]); the small per-session GEMMs run per session so that a
        session's result does not depend on its batch (nodes/common/session_rows.py)."""
        per = (lambda fn, *xs: fn(*xs)) if sessions is None else sessions.each
        x = per(lambda v: self.patch_embedding(v.to(self.dtype)), x)
        b, _, f, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2).float()
        if sessions is None:
            e, e0 = self.embed_time(t)
        else:
            pairs = [self.embed_time(v) for v in sessions.split(t)]
            e, e0 = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        if rope is None:
            rope = self.rope_table.get(frame_start, f, h, w, x.device)
        cp = context_parallel_for(self.parallel)  # None: the plain single-device path
        if camera is not None:
            camera = per(self.embed_camera, camera)
        if cp is not None and sessions is not None:
            raise NotImplementedError("batched sessions with context parallelism")
        if cp is not None:
            if camera is not None:
                raise NotImplementedError("camera input with context parallelism")
            tokens, rope = cp.shard(tokens, rope, f)
        if cache is not None and plan is None:
            plan = self.causal_plan(cache, frame_start, f, h * w if cp is None else cp.cache_frame_tokens(h * w))
            rows = cache.device_rows(plan)
        ctx = CallContext(cross, self.backend, self.kernels, cache, plan, rows, cp, camera, self.fp8_attention,
                          sessions)
        for blk in self.blocks:
            tokens = blk(tokens, e0, rope, ctx)
        out = per(self.head, tokens, e)
        if cp is not None:
            out = cp.gather(out, f)
        pt, ph, pw = self.cfg.patch_size
        out = out.view(b, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, -1, f * pt, h * ph, w * pw)

    def forward(self, x, t, context, clip_fea=None, y=None, cross: CrossCache | None = None, camera=None):
        """Bidirectional Wan: x [B, C, F, H, W] (or list of [C, F, H, W]), t [B] or [B, F],
        context as prepare_cross (ignored when a prepared `cross` is given), I2V: clip_fea
        [B, 257, 1280] and y [B, C_y, F, H, W] concatenated to x on channels; camera (control_type 'cam')
        the Plücker tensor [B, 384, F, H, W] at latent size (None: the plain Wan DiT).
        Returns the flow prediction [B, out_dim, F, H, W] float32."""
        x = torch.stack(list(x)) if isinstance(x, (list, tuple)) else x
        if y is not None:
            x = torch.cat([x, torch.stack(list(y)) if isinstance(y, (list, tuple)) else y], dim=1)
        return self._run(x, t, cross if cross is not None else self.prepare_cross(context, clip_fea), camera=camera)

    @staticmethod
    def causal_plan(cache: SelfKVCache, frame_start: int, frames: int, frame_tokens: int):
        if frame_tokens != cache.frame_tokens:
            raise ValueError(f"{frame_tokens} tokens per frame, cache was built for {cache.frame_tokens}")
        return cache.plan(frame_start, frames)

    def forward_causal(self, x, t, cross: CrossCache, cache: SelfKVCache, frame_start: int, y=None, camera=None):
        """One causal call on a block of latent frames (Self-Forcing CausalWanModel semantics).

        x [B, f, C, H, W] (frame-major, the AR pipelines' layout), t [B, f] per-frame (or [B]),
        frame_start = absolute index of the block's first latent frame (upstream
        current_start // tokens-per-frame). Writes the block's post-RoPE K/V into `cache`
        (every call of a block rewrites the same rows) and attends over the cached
        window + itself. Returns the flow prediction [B, f, out_dim, H, W] float32.
        """
        if self.cfg.patch_size[0] != 1:
            raise ValueError("causal mode needs temporal patch size 1")
        x = x.transpose(1, 2)
        if y is not None:
            x = torch.cat([x, y.transpose(1, 2)], dim=1)
        return self._run(x, t, cross, frame_start, cache, camera=camera).transpose(1, 2)
