"""The Cosmos-Predict2 / 2.5 diffusion transformer (upstream's MiniTrainDIT / MinimalV1LVGDiT).

Parameter names are the released checkpoints' (after ``net.``), so a state dict loads as is.
Layout: activations are [B, T, H, W, D] (T, H, W in patches); per-frame modulation [B, T, 1, 1, D].

- input: cat(latent, condition-frame mask, padding mask) -> (c, kt, kh, kw) patches -> Linear
- time: sinusoid cat(cos, sin) of (t * timestep_scale) per frame; with AdaLN-LoRA the blocks are
  modulated by RMSNorm(sinusoid) and the MLP output (3D wide) is a term added to every branch's
  (shift, scale, gate) and, its first 2D, to the final layer's (shift, scale)
- block: self-attention (q/k RMSNorm per head, 3-D RoPE in rotate-half layout), cross-attention to the
  text (q/k RMSNorm, no RoPE, no mask), GELU MLP; each branch LayerNorm (no affine) * (1 + scale) + shift
  and a gated residual
- output: LayerNorm * (1 + scale) + shift -> Linear -> (kh, kw, kt, c) patches back to video
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nodes.common.attention import attention

from .config import CosmosConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Patchify(nn.Module):
    """[B, C, T*kt, H*kh, W*kw] -> [B, T, H, W, C*kt*kh*kw], features in (c, kt, kh, kw) order."""

    def __init__(self, kt: int, k: int):
        super().__init__()
        self.kt, self.k = kt, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        kt, k = self.kt, self.k
        x = x.reshape(B, C, T // kt, kt, H // k, k, W // k, k)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, T // kt, H // k, W // k, C * kt * k * k)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: CosmosConfig):
        super().__init__()
        if cfg.patch_temporal < 1 or cfg.patch_spatial < 1:
            raise ValueError("patch sizes must be >= 1")
        self.proj = nn.Sequential(Patchify(cfg.patch_temporal, cfg.patch_spatial),
                                  nn.Linear(cfg.in_channels_total * cfg.patch_volume, cfg.model_channels, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Sinusoid(nn.Module):
    """Per-frame timesteps [B, T] -> cat(cos, sin) [B, T, D] in float32 (cast to the timesteps' dtype)."""

    def __init__(self, dim: int, scale: float = 1.0):
        super().__init__()
        self.dim, self.scale = dim, scale

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        tf = t.float()
        if self.scale != 1.0:
            tf = tf * self.scale
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        ang = tf[..., None] * freqs
        return torch.cat([ang.cos(), ang.sin()], dim=-1).to(t.dtype)


class TimestepMLP(nn.Module):
    """linear_1 -> SiLU -> linear_2; with AdaLN-LoRA it returns (the sinusoid itself, the 3D-wide MLP output),
    without it (the MLP output, None)."""

    def __init__(self, dim: int, lora: bool):
        super().__init__()
        self.lora = lora
        self.linear_1 = nn.Linear(dim, dim, bias=not lora)
        self.linear_2 = nn.Linear(dim, 3 * dim if lora else dim, bias=False)

    def forward(self, sinusoid: torch.Tensor):
        sinusoid = sinusoid.to(self.linear_1.weight.dtype)  # computed in float32 (see CosmosDiT.embed_time)
        out = self.linear_2(F.silu(self.linear_1(sinusoid)))
        return (sinusoid, out) if self.lora else (out, None)


def _modulation(cfg: CosmosConfig, chunks: int) -> nn.Sequential:
    D = cfg.model_channels
    if cfg.use_adaln_lora:
        return nn.Sequential(nn.SiLU(), nn.Linear(D, cfg.adaln_lora_dim, bias=False),
                             nn.Linear(cfg.adaln_lora_dim, chunks * D, bias=False))
    return nn.Sequential(nn.SiLU(), nn.Linear(D, chunks * D, bias=False))


class Attention(nn.Module):
    def __init__(self, cfg: CosmosConfig, context_dim: int | None = None):
        super().__init__()
        D, self.heads, self.head_dim = cfg.model_channels, cfg.num_heads, cfg.head_dim
        kv_in = D if context_dim is None else context_dim
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(kv_in, D, bias=False)
        self.v_proj = nn.Linear(kv_in, D, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.eps)
        self.output_proj = nn.Linear(D, D, bias=False)
        self.backend = "auto"

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim))

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (normed) and values of a context [B, L, C] -> [B, L, H, Dh] each."""
        return self.k_norm(self._heads(self.k_proj(context))), self._heads(self.v_proj(context))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [B, L, D]; self-attention when ``kv`` is None (RoPE on q and k), else cross-attention to ``kv``."""
        q = self.q_norm(self._heads(self.q_proj(x)))
        if kv is None:
            k, v = self.kv(x)
            if rope is not None:
                q, k = apply_rope_half(q, *rope), apply_rope_half(k, *rope)
        else:
            k, v = kv
        out = attention(q, k.to(q.dtype), v.to(q.dtype), self.backend)
        return self.output_proj(out.flatten(-2))


class FeedForward(nn.Module):
    def __init__(self, cfg: CosmosConfig):
        super().__init__()
        self.layer1 = nn.Linear(cfg.model_channels, cfg.mlp_dim, bias=False)
        self.layer2 = nn.Linear(cfg.mlp_dim, cfg.model_channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(F.gelu(self.layer1(x)))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift


def _per_frame(m: torch.Tensor) -> torch.Tensor:
    return m[:, :, None, None, :]  # [B, T, D] -> [B, T, 1, 1, D]


class Block(nn.Module):
    def __init__(self, cfg: CosmosConfig):
        super().__init__()
        self.eps, self.lora = cfg.eps, cfg.use_adaln_lora
        self.self_attn = Attention(cfg)
        self.cross_attn = Attention(cfg, cfg.crossattn_emb_channels)
        self.mlp = FeedForward(cfg)
        self.adaln_modulation_self_attn = _modulation(cfg, 3)
        self.adaln_modulation_cross_attn = _modulation(cfg, 3)
        self.adaln_modulation_mlp = _modulation(cfg, 3)

    def _mod(self, layer: nn.Module, emb: torch.Tensor, lora: torch.Tensor | None):
        m = layer(emb)
        if lora is not None:
            m = m + lora
        return [_per_frame(c) for c in m.chunk(3, dim=-1)]

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cross_kv, rope, adaln_lora: torch.Tensor | None = None):
        """x [B, T, H, W, D], emb [B, T, D], cross_kv: this block's text (k, v)."""
        B, T, H, W, D = x.shape
        shift, scale, gate = self._mod(self.adaln_modulation_self_attn, emb, adaln_lora)
        y = self.self_attn(_modulate(x, shift, scale, self.eps).reshape(B, T * H * W, D), rope=rope)
        x = x + gate * y.view(B, T, H, W, D)
        shift, scale, gate = self._mod(self.adaln_modulation_cross_attn, emb, adaln_lora)
        y = self.cross_attn(_modulate(x, shift, scale, self.eps).reshape(B, T * H * W, D), kv=cross_kv)
        x = y.view(B, T, H, W, D) * gate + x
        shift, scale, gate = self._mod(self.adaln_modulation_mlp, emb, adaln_lora)
        return x + gate * self.mlp(_modulate(x, shift, scale, self.eps))


class FinalLayer(nn.Module):
    def __init__(self, cfg: CosmosConfig):
        super().__init__()
        self.eps, self.dim = cfg.eps, cfg.model_channels
        self.linear = nn.Linear(cfg.model_channels, cfg.patch_volume * cfg.out_channels, bias=False)
        self.adaln_modulation = _modulation(cfg, 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, adaln_lora: torch.Tensor | None = None):
        m = self.adaln_modulation(emb)
        if adaln_lora is not None:
            m = m + adaln_lora[..., : 2 * self.dim]
        shift, scale = (_per_frame(c) for c in m.chunk(2, dim=-1))
        return self.linear(_modulate(x, shift, scale, self.eps))


# ---------------------------------------------------------------------- RoPE
def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) channels of one head: h = w = head_dim // 6 * 2, t the rest."""
    dh = head_dim // 6 * 2
    return head_dim - 2 * dh, dh, dh


def rope_angles(cfg: CosmosConfig, T: int, H: int, W: int, device=None, fps: float | None = None) -> torch.Tensor:
    """Half-width angles [T*H*W, D/2] in (t, h, w) token order: per axis pos * theta_x^(-2i/dim_x) with NTK
    scaling theta_x = 1e4 * ratio_x^(dim_x / (dim_x - 2)); computed in float32 as upstream."""
    dt, dh, dw = rope_axis_dims(cfg.head_dim)
    f32 = dict(dtype=torch.float32, device=device)

    def freqs(dim: int, ratio: float) -> torch.Tensor:
        theta = 10000.0 * ratio ** (dim / (dim - 2))
        return 1.0 / theta ** (torch.arange(0, dim, 2, **f32)[: dim // 2] / dim)

    pos_t = torch.arange(T, **f32)
    if cfg.rope_enable_fps_modulation and fps is not None:
        pos_t = pos_t / fps * cfg.base_fps
    at = torch.outer(pos_t, freqs(dt, cfg.rope_t_extrapolation_ratio))
    ah = torch.outer(torch.arange(H, **f32), freqs(dh, cfg.rope_h_extrapolation_ratio))
    aw = torch.outer(torch.arange(W, **f32), freqs(dw, cfg.rope_w_extrapolation_ratio))
    ang = torch.cat([at[:, None, None].expand(T, H, W, -1), ah[None, :, None].expand(T, H, W, -1),
                     aw[None, None, :].expand(T, H, W, -1)], dim=-1)
    return ang.reshape(T * H * W, -1)


def rope_cos_sin(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, 1, D] of the full (two-halves) layout, float32."""
    full = torch.cat([angles, angles], dim=-1)[:, None, :]
    return full.cos(), full.sin()


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D] rotated in the rotate-half layout (pairs (d, d + D/2)), in float32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


# ---------------------------------------------------------------------- network
class CosmosDiT(nn.Module):
    """MiniTrainDIT (``video_condition``: MinimalV1LVGDiT, which adds the condition-frame mask channel)."""

    def __init__(self, cfg: CosmosConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.model_channels
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = nn.Sequential(Sinusoid(D, cfg.timestep_scale), TimestepMLP(D, cfg.use_adaln_lora))
        self.t_embedding_norm = RMSNorm(D, cfg.eps)
        if cfg.crossattn_proj_in_channels is not None:
            self.crossattn_proj = nn.Sequential(nn.Linear(cfg.crossattn_proj_in_channels, cfg.crossattn_emb_channels),
                                                nn.GELU())
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_blocks))
        self.final_layer = FinalLayer(cfg)
        self._rope: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def backend(self) -> str:
        return self.blocks[0].self_attn.backend if len(self.blocks) else "auto"

    @backend.setter
    def backend(self, name: str) -> None:
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = name

    # ------------------------------------------------------------------ pieces
    def prepare_cross(self, text: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Text embeddings [B, L, C] -> every block's cross-attention (k, v); computed once per prompt."""
        dtype = self.x_embedder.proj[1].weight.dtype
        text = text.to(dtype)
        if hasattr(self, "crossattn_proj"):
            text = self.crossattn_proj(text)
        return [b.cross_attn.kv(text) for b in self.blocks]

    def embed_time(self, timesteps_B_T: torch.Tensor):
        """Per-frame timesteps [B, T] -> (block modulation input [B, T, D], AdaLN-LoRA term [B, T, 3D] or None)."""
        # The timesteps stay float32 up to the sinusoid, as upstream scales them (int64 * timestep_scale) and
        # embeds them in float32: in bf16, Predict2.5's 0..1000 timesteps would round (994 -> 992) first.
        emb, lora = self.t_embedder(timesteps_B_T.float())
        return self.t_embedding_norm(emb), lora

    def rope(self, T: int, H: int, W: int, device, fps: float | None = None):
        key = (T, H, W, str(device), fps if self.cfg.rope_enable_fps_modulation else None)
        if key not in self._rope:
            if len(self._rope) > 4:
                self._rope.clear()
            self._rope[key] = rope_cos_sin(rope_angles(self.cfg, T, H, W, device, fps))
        return self._rope[key]

    def embed_input(self, x: torch.Tensor, condition_mask: torch.Tensor | None = None,
                    padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, T, H, W] (+ mask [B, 1, T, H, W], padding mask [B, 1, h, w] any size) -> [B, T', H', W', D]."""
        B, _, T, H, W = x.shape
        parts = [x]
        if self.cfg.video_condition:
            parts.append(x.new_zeros(B, 1, T, H, W) if condition_mask is None else condition_mask.type_as(x))
        if self.cfg.concat_padding_mask:
            if padding_mask is None:
                pm = x.new_zeros(B, 1, T, H, W)
            else:
                pm = F.interpolate(padding_mask.type_as(x), size=(H, W), mode="nearest")
                pm = pm[:, :, None].expand(B, 1, T, H, W)
            parts.append(pm)
        return self.x_embedder(torch.cat(parts, dim=1))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H, W, (kh kw kt C)] -> [B, C, T*kt, H*kh, W*kw]."""
        B, T, H, W, _ = x.shape
        k, kt = self.cfg.patch_spatial, self.cfg.patch_temporal
        x = x.reshape(B, T, H, W, k, k, kt, -1)
        return x.permute(0, 7, 1, 6, 2, 4, 3, 5).reshape(B, -1, T * kt, H * k, W * k)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, timesteps_B_T: torch.Tensor, crossattn_emb: torch.Tensor | None = None, *,
                condition_mask: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                fps: float | None = None, cross: list | None = None) -> torch.Tensor:
        """x [B, C, T, H, W] (latent frames), timesteps [B, T] (or [B]: one per sample) -> [B, C_out, T, H, W].

        ``cross`` (from ``prepare_cross``) replaces ``crossattn_emb`` when the same prompt is used again."""
        dtype = self.x_embedder.proj[1].weight.dtype
        h = self.embed_input(x.to(dtype), condition_mask, padding_mask)
        B, T, H, W, _ = h.shape
        if timesteps_B_T.ndim == 1:
            timesteps_B_T = timesteps_B_T[:, None]
        if timesteps_B_T.shape[1] == 1 and T > 1:
            timesteps_B_T = timesteps_B_T.expand(-1, T)
        emb, lora = self.embed_time(timesteps_B_T)
        if cross is None:
            cross = self.prepare_cross(crossattn_emb)
        rope = self.rope(T, H, W, h.device, fps)
        for block, kv in zip(self.blocks, cross):
            h = block(h, emb, kv, rope, lora)
        return self.unpatchify(self.final_layer(h, emb, lora))
