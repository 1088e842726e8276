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
from nodes.cosmos.model import Attention, CosmosDiT, Patchify, _modulate, apply_rope_half, rope_angles, rope_axis_dims

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

    def __init__(self, cfg: CosmosConfig, hdmap_channels: int, camera_embeddings: int = 0):
        """``camera_embeddings`` > 0: the multi-view network (view AdaLN embedder with that many camera rows,
        cross-view attention in every block); 0: single view."""
        if cfg.rope_enable_fps_modulation:
            raise ValueError("OmniDreams uses no RoPE fps modulation")
        super().__init__(cfg)
        self.hdmap_channels = hdmap_channels
        self.camera_embeddings = camera_embeddings
        self.additional_patch_embedding = HDMapEmbed(cfg, hdmap_channels)
        D = cfg.model_channels
        if camera_embeddings:
            self.adaln_view_embedder = nn.Embedding(camera_embeddings, D)
            self.adaln_view_proj = nn.Linear(D, 9 * D)
            for block in self.blocks:
                block.layer_norm_cross_view_attn = nn.LayerNorm(D, eps=cfg.eps)
                block.cross_view_attn = Attention(cfg)
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
    def view_terms(self, views: torch.Tensor) -> list[torch.Tensor]:
        """Camera indices [N] -> the view's AdaLN terms of the three branches, each [N, 1, 1, 1, 3D]."""
        v = self.adaln_view_proj(self.adaln_view_embedder(views))
        return [c[:, None, None, None] for c in v.chunk(3, dim=-1)]

    def forward_chunk(self, x: torch.Tensor, t: torch.Tensor, hdmap: torch.Tensor, cross: list, *,
                      condition_mask: torch.Tensor | None, cache, plan, rows=None,
                      views: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, C, T, H, W] latent chunk, t [N] or [N, T'] timesteps, hdmap [N, C_hd, T, H, W],
        ``cross`` from ``prepare_cross``; writes the chunk's K/V at ``plan``'s cache rows and attends to the
        cached window. Multi-view: N = B*V samples in (b, v) order and ``views`` [V] their camera indices;
        each view has its own cache rows (the batch axis). Returns the flow [N, C_out, T, H, W]."""
        dtype = self.x_embedder.proj[1].weight.dtype
        h = self.embed_input(x.to(dtype), condition_mask) + self.additional_patch_embedding(hdmap.to(dtype))
        B, T, H, W, D = h.shape
        if t.ndim == 1:
            t = t[:, None]
        emb, lora = self.embed_time(t.expand(B, T) if t.shape[1] == 1 else t)
        cos, sin = self.rope_at(plan.frame_start, T, H, W, h.device)
        vterms = None
        if self.camera_embeddings:
            if views is None or B % len(views):
                raise ValueError(f"the multi-view network needs the view indices of its {B} samples")
            vterms = self.view_terms(views.to(h.device).repeat(B // len(views)))
        for i, (block, kv) in enumerate(zip(self.blocks, cross)):
            h = self._block(i, block, h, emb, kv, (cos, sin), lora, cache, plan, rows, vterms,
                            0 if views is None else len(views))
        return self.unpatchify(self.final_layer(h, emb, lora))

    @staticmethod
    def _mods(block, layer, emb, lora, vterm):
        shift, scale, gate = block._mod(layer, emb, lora)
        if vterm is None:
            return shift, scale, gate
        vs, vc, vg = vterm.chunk(3, dim=-1)
        return shift + vs, scale + vc, gate + vg

    @staticmethod
    def _cross_view(block, x: torch.Tensor, V: int) -> torch.Tensor:
        """Every view's tokens of a latent frame attend to all views' tokens of that frame (no RoPE, no gate)."""
        N, T, H, W, D = x.shape
        y = block.layer_norm_cross_view_attn(x).reshape(N // V, V, T, H * W, D).transpose(1, 2)
        y = block.cross_view_attn(y.reshape(N // V * T, V * H * W, D))          # rope None: plain attention
        return y.reshape(N // V, T, V, H, W, D).transpose(1, 2).reshape(N, T, H, W, D)

    def _block(self, i, block, x, emb, cross_kv, rope, lora, cache, plan, rows, vterms=None, V=0):
        B, T, H, W, D = x.shape
        a = block.self_attn
        vt = vterms or (None, None, None)
        shift, scale, gate = self._mods(block, block.adaln_modulation_self_attn, emb, lora, vt[0])
        y = _modulate(x, shift, scale, block.eps).reshape(B, T * H * W, D)
        q = apply_rope_half(a.q_norm(a._heads(a.q_proj(y))), *rope)
        k, v = a.kv(y)
        cache.write(i, plan, apply_rope_half(k, *rope), v, rows)
        keys, values = cache.keys_values(i, plan, rows)
        y = a.output_proj(attention(q, keys.to(q.dtype), values.to(q.dtype), a.backend).flatten(-2))
        x = x + gate * y.view(B, T, H, W, D)
        if V:
            x = x + self._cross_view(block, x, V)
        shift, scale, gate = self._mods(block, block.adaln_modulation_cross_attn, emb, lora, vt[1])
        y = block.cross_attn(_modulate(x, shift, scale, block.eps).reshape(B, T * H * W, D), kv=cross_kv)
        x = x + gate * y.view(B, T, H, W, D)
        shift, scale, gate = self._mods(block, block.adaln_modulation_mlp, emb, lora, vt[2])
        return x + gate * block.mlp(_modulate(x, shift, scale, block.eps))
