"""Seeded Gaussian latent noise, one chunk per block."""
from __future__ import annotations

import torch

from engine.node import Node, Param, Port
from engine.types import INT, LATENT


class GaussianNoise(Node):
    type_name = "noise.gaussian"
    doc = ("Seeded Gaussian latents [B, F, C, H, W] for each block. Block b draws from a generator seeded with "
           "(seed, b), so a block's noise does not depend on how many blocks ran before it in this process.")
    inputs = (Port("seed", INT, "base seed", optional=True),)
    outputs = (Port("latent", LATENT, "noise [B, F, C, H, W]"),)
    params = (
        Param("batch", int, 1, "batch size", min=1),
        Param("frames", int, 3, "latent frames per block", min=1),
        Param("channels", int, 16, "latent channels", min=1),
        Param("height", int, 8, "latent height", min=1),
        Param("width", int, 8, "latent width", min=1),
        Param("seed", int, 0, "seed when the `seed` input is not wired"),
    )

    def run(self, inputs, state, step):
        seed = int(inputs.get("seed", self.p.seed))
        g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + (step.block or 0))
        shape = (self.p.batch, self.p.frames, self.p.channels, self.p.height, self.p.width)
        return {"latent": torch.randn(shape, generator=g).to(self.device)}


NODE_TYPES = (GaussianNoise,)
