"""Predict2.5 Video2World sampling: velocity prediction, frame conditioning, guidance, UniPC over the flow path.

Predict2.5 (upstream's ``Video2WorldModelRectifiedFlow``) is a rectified-flow model: x_t = (1 - s) x0 + s noise,
the network sees x_t itself (no input scaling) with the timestep 1000 s (the DiT multiplies it by its
``timestep_scale``, 0.001) and predicts the velocity v = noise - x0. One call at timestep t:

- conditional frames (mask 1) of the input are replaced by the clean latents; with ``conditional_frame_timestep``
  >= 0 their per-frame timestep is pinned to it (0.1 on the 1000 scale for the released post-trained model;
  a negative value leaves them at t, as the pre-trained config does);
- the velocity of the conditional frames is replaced by ``noise - clean`` (the initial noise of the rollout),
  so the solver's x0 = x_t - s v keeps them on the straight path to the clean latents.

Guidance is upstream's Video2World form on velocities: ``v_c + g * (v_c - v_u)``; both branches keep the
conditional frames (the unconditional one differs only in its text). T2V is the same with no conditional frame.
The solver is the shared ``FlowUniPC`` (nodes/samplers) on Cosmos' schedule: ``karras_flow_schedule`` (the
released default: N + 1 calls for N steps) or the shifted linear one (``shift``), from the same initial noise
as the AB2 sampler (numpy's device-invariant draw).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from nodes.samplers.unipc import FlowUniPC, karras_flow_schedule, shifted_flow_schedule

from .model import CosmosDiT
from .scheduler import device_invariant_noise
from .video2world import Video2World

def flow_schedule(kind: str, num_steps: int, shift: float = 5.0, sigma_min: float = 0.01, sigma_max: float = 200.0,
                  rho: float = 7.0) -> tuple[Tensor, Tensor]:
    """(timesteps, sigmas) of upstream's ``set_timesteps(N, shift, use_kerras_sigma)`` for a scheduler built with
    shift 1: ``karras`` ignores ``shift``; ``shift`` ignores the Karras bounds."""
    if kind == "karras":
        return karras_flow_schedule(num_steps, sigma_min, sigma_max, rho)
    if kind == "shift":
        return shifted_flow_schedule(num_steps, shift)
    raise ValueError(f"schedule must be karras or shift, got {kind!r}")


class FlowVideo2World:
    def __init__(self, model: CosmosDiT, conditional_frame_timestep: float = 0.1, fps: float | None = None):
        self.model, self.conditional_frame_timestep, self.fps = model, conditional_frame_timestep, fps

    def velocity(self, xt: Tensor, timestep: Tensor, cross, noise: Tensor, gt: Tensor | None = None,
                 mask: Tensor | None = None, padding_mask: Tensor | None = None) -> Tensor:
        """Velocity [B, C, T, H, W] (float32) of x_t at ``timestep`` [B] (1000 scale); ``cross`` from
        ``model.prepare_cross``; ``mask`` [B, 1, T, H, W] marks the conditional frames of ``gt``."""
        B, T = xt.shape[0], xt.shape[2]
        t_B_T = timestep.reshape(B, 1).float().expand(B, T)
        if mask is not None:
            m = mask.expand_as(xt).type_as(xt)
            xt = gt.type_as(xt) * m + xt * (1 - m)
            if self.conditional_frame_timestep >= 0:
                m_t = m.mean(dim=[1, 3, 4])                                          # [B, T]
                t_B_T = self.conditional_frame_timestep * m_t + t_B_T * (1 - m_t)
        out = self.model(xt, t_B_T, condition_mask=mask, padding_mask=padding_mask, fps=self.fps, cross=cross).float()
        if mask is not None:
            out = (noise - gt.type_as(out)) * m + out * (1 - m)
        return out

    @staticmethod
    def guide(v_cond: Tensor, v_uncond: Tensor, guidance: float) -> Tensor:
        """Upstream's Video2World guidance on velocities: ``cond + g * (cond - uncond)``."""
        return v_cond + guidance * (v_cond - v_uncond)

    def velocity_fn(self, cond, uncond=None, guidance: float = 0.0, gt: Tensor | None = None,
                    num_conditional_frames: int = 0, batched: bool = False
                    ) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """``fn(noise, x, timestep)``: the (guided) velocity. ``batched`` runs both branches as one forward of
        twice the batch (the text K/V of both prompts must have the same length, else two forwards)."""
        mask = None
        if num_conditional_frames:
            if gt is None:
                raise ValueError("conditional frames need their clean latents")
            mask = Video2World.condition_mask(gt, num_conditional_frames)
        if uncond is not None and batched and any(c[0].shape[1:] != u[0].shape[1:] for c, u in zip(cond, uncond)):
            batched = False
        if uncond is not None and batched:
            both = [(torch.cat([ck, uk]), torch.cat([cv, uv])) for (ck, cv), (uk, uv) in zip(cond, uncond)]
            gt2 = None if gt is None else torch.cat([gt, gt])
            mask2 = None if mask is None else torch.cat([mask, mask])

        def fn(noise: Tensor, x: Tensor, timestep: Tensor) -> Tensor:
            if uncond is None:
                return self.velocity(x, timestep, cond, noise, gt, mask)
            if batched:
                vc, vu = self.velocity(torch.cat([x, x]), torch.cat([timestep, timestep]), both,
                                       torch.cat([noise, noise]), gt2, mask2).chunk(2)
                return self.guide(vc, vu, guidance)
            return self.guide(self.velocity(x, timestep, cond, noise, gt, mask),
                              self.velocity(x, timestep, uncond, noise, gt, mask), guidance)
        return fn

    @staticmethod
    def sample(velocity_fn: Callable[[Tensor, Tensor, Tensor], Tensor], shape, seed: int,
               schedule: tuple[Tensor, Tensor], device=None, noise: Tensor | None = None,
               on_step: Callable | None = None) -> Tensor:
        """The whole rollout: x = noise, one UniPC step per timestep of ``schedule`` (``flow_schedule``), ending at
        sigma 0 (the last step returns the x0 prediction)."""
        sched = FlowUniPC()
        sched.set_schedule(*schedule)
        if noise is None:
            noise = device_invariant_noise(shape, seed)
        noise = noise.to(device=device, dtype=torch.float32)
        x = noise
        B = x.shape[0]
        for i, t in enumerate(sched.timesteps):
            v = velocity_fn(noise, x, t.to(x.device).repeat(B))
            x = sched.step(v, t, x)
            if on_step is not None:
                on_step(i, v, x)
        return x
