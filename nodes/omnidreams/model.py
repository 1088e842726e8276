"""The OmniDreams network: Cosmos-Predict2.5's MiniTrainDIT (nodes.cosmos) plus an HD-map patch embedding,
run one chunk at a time against a self-attention KV cache.

- input: ``x_embedder(cat(latent, condition mask, padding mask))`` + ``additional_patch_embedding(hdmap)``;
  the HD-map branch patchifies the HD-map latent like the video ((c, kt, kh, kw) features) and projects it
  without bias; its channel count (16: VAE latent, 192: pixel-shuffled HD-map) comes from the weights.
- self-attention: queries of the chunk; keys (RoPE'd at their absolute temporal position before caching)
  and values of the cached window, the chunk's own rows included (nodes.common.kv_cache.SelfKVCache).
- RoPE: Cosmos' 3-D table (NTK h/w/t extrapolation ratios) with temporal positions counted from the
  chunk's first latent frame of the rollout.
- everything else (time embedding, AdaLN-LoRA, cross-attention, MLP, final layer) is ``CosmosDiT``'s.
"""
from __future__ import annotations

import torch
from torch import nn

from nodes.common.attention import attention
from nodes.cosmos.config import CosmosConfig
from nodes.cosmos.model import CosmosDiT, Patchify, _modulate, apply_rope_half, rope_angles, rope_axis_dims

HDMAP_KEY = "additional_patch_embedding.proj.1.weight"


class HDMapEmbed(nn.Module):
    """HD-map latent [B, C_hd, T, H, W] -> tokens [B, T', H', W', D]: the video's patchify, then a bias-free Linear."""

    def __init__(self, cfg: CosmosConfig, channels: int):
        super().__init__()
        self.proj = nn.Sequential(Patchify(cfg.patch_temporal, cfg.patch_spatial),
                                  nn.Linear(channels * cfg.patch_volume, cfg.model_channels, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class OmniDreamsNet(CosmosDiT):
    """``CosmosDiT`` with the HD-map patch embedding (parameter names as the released ``net.*`` checkpoint)."""

    def __init__(self, cfg: CosmosConfig, hdmap_channels: int):
        if cfg.rope_enable_fps_modulation:
            raise ValueError("OmniDreams uses no RoPE fps modulation")
        super().__init__(cfg)
        self.hdmap_channels = hdmap_channels
        self.additional_patch_embedding = HDMapEmbed(cfg, hdmap_channels)
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ RoPE at an offset
    def rope_at(self, t0: int, T: int, H: int, W: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T*H*W, 1, head_dim] of token frames t0 .. t0+T-1 (absolute temporal positions)."""
        key = (t0, T, H, W, str(device))
        if key not in self._tables:
            if len(self._tables) > 16:
                self._tables.clear()
            cfg = self.cfg
            half_t = rope_axis_dims(cfg.head_dim)[0] // 2
            freq_t = rope_angles(cfg, 2, 1, 1, device)[1, :half_t]           # position 1: the frequencies
            at = torch.outer(torch.arange(t0, t0 + T, dtype=torch.float32, device=device), freq_t)
            hw = rope_angles(cfg, 1, H, W, device)[:, half_t:]               # [H*W, h + w halves]
            ang = torch.cat([at[:, None].expand(T, H * W, half_t), hw[None].expand(T, -1, -1)], -1)
            full = torch.cat([ang, ang], dim=-1).reshape(T * H * W, 1, -1)
            self._tables[key] = (full.cos(), full.sin())
        return self._tables[key]

    # ------------------------------------------------------------------ one chunk
    def forward_chunk(self, x: torch.Tensor, t: torch.Tensor, hdmap: torch.Tensor, cross: list, *,
                      condition_mask: torch.Tensor | None, cache, plan, rows=None) -> torch.Tensor:
        """x [B, C, T, H, W] latent chunk, t [B] or [B, T'] timesteps, hdmap [B, C_hd, T, H, W],
        ``cross`` from ``prepare_cross``; writes the chunk's K/V at ``plan``'s cache rows and attends to the
        cached window. Returns the flow [B, C_out, T, H, W]."""
        dtype = self.x_embedder.proj[1].weight.dtype
        h = self.embed_input(x.to(dtype), condition_mask) + self.additional_patch_embedding(hdmap.to(dtype))
        B, T, H, W, D = h.shape
        if t.ndim == 1:
            t = t[:, None]
        emb, lora = self.embed_time(t.expand(B, T) if t.shape[1] == 1 else t)
        cos, sin = self.rope_at(plan.frame_start, T, H, W, h.device)
        for i, (block, kv) in enumerate(zip(self.blocks, cross)):
            h = self._block(i, block, h, emb, kv, (cos, sin), lora, cache, plan, rows)
        return self.unpatchify(self.final_layer(h, emb, lora))

    @staticmethod
    def _block(i, block, x, emb, cross_kv, rope, lora, cache, plan, rows):
        B, T, H, W, D = x.shape
        a = block.self_attn
        shift, scale, gate = block._mod(block.adaln_modulation_self_attn, emb, lora)
        y = _modulate(x, shift, scale, block.eps).reshape(B, T * H * W, D)
        q = apply_rope_half(a.q_norm(a._heads(a.q_proj(y))), *rope)
        k, v = a.kv(y)
        cache.write(i, plan, apply_rope_half(k, *rope), v, rows)
        keys, values = cache.keys_values(i, plan, rows)
        y = a.output_proj(attention(q, keys.to(q.dtype), values.to(q.dtype), a.backend).flatten(-2))
        x = x + gate * y.view(B, T, H, W, D)
        shift, scale, gate = block._mod(block.adaln_modulation_cross_attn, emb, lora)
        y = block.cross_attn(_modulate(x, shift, scale, block.eps).reshape(B, T * H * W, D), kv=cross_kv)
        x = x + gate * y.view(B, T, H, W, D)
        shift, scale, gate = block._mod(block.adaln_modulation_mlp, emb, lora)
        return x + gate * block.mlp(_modulate(x, shift, scale, block.eps))
