"""Small generic tensor nodes: enough for a laptop-sized demo and for engine tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.node import Node, Param, Port
from engine.types import LATENT, PIXELS


class LatentPreview(Node):
    type_name = "tensor.latent_preview"
    doc = ("A parameter-free preview decoder: a fixed seeded projection of latent channels to RGB, nearest "
           "upsampling, tanh. Not a model; it makes latents visible without weights.")
    inputs = (Port("latent", LATENT, "latents [B, F, C, H, W]"),)
    outputs = (Port("pixels", PIXELS, "frames [B, F*temporal, 3, H*scale, W*scale] in [-1, 1]"),)
    params = (
        Param("scale", int, 8, "spatial upsampling factor", min=1, max=64),
        Param("temporal", int, 1, "frames per latent frame", min=1, max=8),
        Param("seed", int, 0, "seed of the channel projection"),
    )

    def run(self, inputs, state, step):
        x = inputs["latent"].float()
        b, f, c, h, w = x.shape
        g = torch.Generator().manual_seed(self.p.seed)
        proj = (torch.randn(3, c, generator=g) / c ** 0.5).to(x.device)
        rgb = torch.einsum("bfchw,rc->bfrhw", x, proj).reshape(b * f, 3, h, w)
        rgb = F.interpolate(rgb, scale_factor=self.p.scale, mode="nearest")
        rgb = rgb.reshape(b, f, 1, 3, h * self.p.scale, w * self.p.scale).expand(-1, -1, self.p.temporal, -1, -1, -1)
        return {"pixels": torch.tanh(rgb.reshape(b, f * self.p.temporal, 3, h * self.p.scale, w * self.p.scale))}


class TemporalBlend(Node):
    type_name = "tensor.temporal_blend"
    doc = ("Exponential blend of each block with the previous block's output (per-session state): "
           "y_b = decay * y_{b-1} + (1 - decay) * x_b. Shows how node state survives blocks and resets.")
    inputs = (Port("latent", LATENT, "latents of this block"),)
    outputs = (Port("latent", LATENT, "blended latents"),)
    params = (Param("decay", float, 0.7, "weight of the previous block", min=0.0, max=1.0),)

    def new_state(self):
        return {"prev": None}

    def state_tensors(self, state) -> dict:
        return {} if state["prev"] is None else {"prev": state["prev"]}

    def load_state(self, state, values: dict):
        prev = values.get("prev")
        state["prev"] = None if prev is None else prev.to(self.device, copy=True)
        return state

    def run(self, inputs, state, step):
        x = inputs["latent"]
        y = x if state["prev"] is None else self.p.decay * state["prev"] + (1 - self.p.decay) * x
        state["prev"] = y
        return {"latent": y}


NODE_TYPES = (LatentPreview, TemporalBlend)
