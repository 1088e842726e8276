"""The world model's two networks: an action-conditioned causal Wan DiT and a tiny frame decoder.

``ActionWanDiT`` is our Wan DiT (nodes/wan/dit.py) with LingBot-World's camera path reused for
actions: where LingBot embeds a Plücker-ray patch per token, we look up a learned embedding of the
frame's action (one letter per frame) for every token of that frame; the residual MLP after it and
the per-block injector (``Block.inject_camera``: x * (1 + scale) + shift after self-attention) are
LingBot's layers, unchanged. So the causal path (KV cache, RoPE, the causal-model contract and its
CUDA graphs) is the one every Wan model runs. The model has no prompt: cross-attention reads a
learned ``world_context`` (a few "text" tokens), which the node hands to ``ar.sampler`` as its
text condition.

``FrameDecoder`` maps one latent frame (4x smaller, normalized) to pixels; no temporal state, so
it streams block by block for free. The latent statistics it undoes are buffers in the weights.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from nodes.wan.config import WanConfig
from nodes.wan.dit import WanDiT

from .config import DecoderConfig


class ActionWanDiT(WanDiT):
    """WanDiT whose camera condition is a per-token action id [B, f, h, w] (patch grid)."""

    def __init__(self, cfg: WanConfig, num_actions: int):
        super().__init__(replace(cfg, control_type="cam"))
        del self.patch_embedding_wancamctrl          # Plücker patches: replaced by the action table
        self.action_embedding = nn.Embedding(num_actions, cfg.dim)
        self.world_context = nn.Parameter(torch.zeros(1, cfg.text_len, cfg.text_dim))

    def embed_camera(self, actions: torch.Tensor) -> torch.Tensor:
        """Action ids [B, f, h, w] (each token its frame's action) -> tokens [B, f*h*w, dim], through the
        camera path's residual MLP."""
        e = self.action_embedding(actions.long().flatten(1)).to(self.dtype)
        return e + self.c2ws_hidden_states_layer2(F.silu(self.c2ws_hidden_states_layer1(e)))

    def context(self, batch: int = 1) -> torch.Tensor:
        """The learned stand-in for a prompt: [batch, text_len, text_dim]."""
        return self.world_context.expand(batch, -1, -1)


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class FrameDecoder(nn.Module):
    """Normalized latent [N, C, h, w] -> pixels [N, 3, 4h, 4w] in [-1, 1] (clamped at inference)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        c0, c1, c2 = cfg.channels
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))
        self.conv_in = nn.Conv2d(cfg.latent_channels, c0, 3, padding=1)
        self.block0 = ResBlock(c0)
        self.up1 = nn.Conv2d(c0, c1, 3, padding=1)
        self.block1 = ResBlock(c1)
        self.up2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv_out = nn.Conv2d(c2, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z * self.latent_std.view(1, -1, 1, 1) + self.latent_mean.view(1, -1, 1, 1)
        h = self.block0(self.conv_in(z))
        h = self.block1(self.up1(F.interpolate(F.silu(h), scale_factor=2.0, mode="nearest")))
        h = self.up2(F.interpolate(F.silu(h), scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(h))

    def decode_video(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, T, C, h, w] -> [B, T, 3, H, W] in [-1, 1]."""
        b, t = latent.shape[:2]
        return self(latent.flatten(0, 1)).clamp(-1, 1).unflatten(0, (b, t))
