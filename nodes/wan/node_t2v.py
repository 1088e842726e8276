"""`wan.t2v_sampler`: bidirectional Wan 2.1 sampling of a whole clip in one engine block (T2V and I2V).

As wan/text2video.py and wan/image2video.py: noise [C, 1 + (frames-1)/4, h, w] from a
generator seeded with the seed on the model's device, UniPC (or Euler) over the shifted
flow schedule, and classifier-free guidance against the negative prompt
``uncond + scale * (cond - uncond)``. The prompts' cross-attention K/V are computed once
for all steps. I2V adds the CLIP image tokens and the ``y`` conditioning (mask + image
latents, from ``wan.vae_encode`` in ``i2v_condition`` mode).
"""
from __future__ import annotations

import torch

from engine.errors import FdError
from engine.node import Node, Param, Port
from engine.types import DENOISER, IMAGE_EMBEDDING, INT, LATENT, TEXT_EMBEDDING


class WanT2VSamplerNode(Node):
    type_name = "wan.t2v_sampler"
    doc = ("Wan 2.1 bidirectional sampler: the whole clip in block 0 (UniPC or Euler, CFG against the negative "
           "prompt). I2V when CLIP tokens and y are wired.")
    inputs = (
        Port("model", DENOISER, "Wan DiT (wan.dit)"),
        Port("text", TEXT_EMBEDDING, "prompt embeddings"),
        Port("negative", TEXT_EMBEDDING, "negative prompt embeddings (CFG); without it, no guidance", optional=True),
        Port("clip", IMAGE_EMBEDDING, "I2V: CLIP image tokens [B, 257, 1280]", optional=True),
        Port("y", LATENT, "I2V: conditioning [B, F, 4 + z, h, w] (wan.vae_encode mode i2v_condition)",
             optional=True),
        Port("seed", INT, "noise seed (else the seed param)", optional=True),
    )
    outputs = (Port("latent", LATENT, "clean latents of the clip [B, 1 + (frames-1)/4, C, h, w]"),)
    params = (
        Param("solver", str, "unipc", "unipc (Wan's default) or euler", choices=("unipc", "euler")),
        Param("num_steps", int, 50, "sampling steps", min=1),
        Param("shift", float, 5.0, "flow shift (Wan: 5.0; 3.0 for I2V at 480p)", min=0.0),
        Param("guide_scale", float, 5.0, "CFG scale (needs the negative input)", min=0.0),
        Param("frames", int, 81, "pixel frames (1 + 4k)", min=1),
        Param("latent_channels", int, 16, "noise channels", min=1),
        Param("latent_height", int, 60, "latent height (pixel height / 8)", min=1),
        Param("latent_width", int, 104, "latent width (pixel width / 8)", min=1),
        Param("seed", int, 0, "noise seed when the seed input is not wired"),
        Param("cfg", str, "separate", "CFG passes: separate (two forwards, upstream) or batched (the conditional "
              "and unconditional passes as one batch-2 forward: same math, bigger kernels)",
              choices=("separate", "batched")),
    )

    def run(self, inputs, state, step):
        from nodes.samplers import FlowEuler, FlowUniPC, cfg_combine, guided

        if step.block not in (0, None):
            raise FdError(f"node {self.name!r}: wan.t2v_sampler makes the whole clip in block 0; run one block "
                          "(inputs.num_blocks: 1)")
        if (self.p.frames - 1) % 4:
            raise FdError(f"node {self.name!r}: frames={self.p.frames} must be 1 + 4k")
        h = inputs["model"]
        dit, dev = h.module, h.module.patch_embedding.weight.device
        clip, y = inputs.get("clip"), inputs.get("y")
        if (clip is None) != (y is None) or (clip is not None) != (h.config.model_type == "i2v"):
            raise FdError(f"node {self.name!r}: an i2v DiT needs both clip and y wired, a t2v DiT neither "
                          f"(model_type {h.config.model_type})")
        g = torch.Generator(device=dev).manual_seed(int(inputs.get("seed", self.p.seed)))
        f_lat = (self.p.frames - 1) // 4 + 1
        shape = (self.p.latent_channels, f_lat, self.p.latent_height, self.p.latent_width)
        x = torch.randn(shape, generator=g, device=dev, dtype=torch.float32)[None]
        if clip is not None:
            clip, y = clip.to(dev), y.to(dev).transpose(1, 2)  # y to [B, C, F, h, w]
        with torch.no_grad():
            cond = {"cross": dit.prepare_cross(inputs["text"].to(dev), clip), "y": y}
            negative = inputs.get("negative")
            uncond = None if negative is None else {"cross": dit.prepare_cross(negative.to(dev), clip), "y": y}
            sched = FlowUniPC() if self.p.solver == "unipc" else FlowEuler()
            sched.set_timesteps(self.p.num_steps, shift=self.p.shift)

            def model(xx, tt, cross, y):
                return dit(xx, tt, None, y=y, cross=cross)

            guide = uncond is not None and self.p.guide_scale != 1.0
            if guide and self.p.cfg == "batched":   # both prompts' K/V stacked once, for every step
                both = {"cross": stack_cross(cond["cross"], uncond["cross"]),
                        "y": None if y is None else torch.cat([y, y])}
            for t in sched.timesteps:
                tt = t.reshape(1).to(dev)
                if not guide:
                    flow = model(x, tt, **cond)
                elif self.p.cfg == "batched":
                    flow_c, flow_u = model(torch.cat([x, x]), tt.expand(2), **both).chunk(2)
                    flow = cfg_combine(flow_c, flow_u, self.p.guide_scale)
                else:
                    flow = guided(model, x, tt, cond, uncond, self.p.guide_scale)
                x = sched.step(flow, t, x)
        return {"latent": x.transpose(1, 2)}


def stack_cross(a, b):
    """Two prompts' cross-attention K/V (each batch B) as one CrossCache of batch 2B, a's rows first."""
    from .dit import CrossCache

    def cat(x, y):
        return None if x is None else [torch.cat([p, q]) for p, q in zip(x, y)]
    return CrossCache(cat(a.k, b.k), cat(a.v, b.v), cat(a.k_img, b.k_img), cat(a.v_img, b.v_img))


NODE_TYPES = (WanT2VSamplerNode,)
