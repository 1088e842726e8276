"""Video2World sampling with the Cosmos DiT: x0 prediction, frame conditioning, guidance, the whole loop.

One call of the network at noise level sigma (upstream's ``Video2WorldPipeline.denoise`` with the
FRAME_REPLACE strategy):

- t = sigma / (sigma + 1); the network input is (1 - t) * x_t, except on conditional frames (mask 1),
  which are replaced by the clean latents; their per-frame timestep is t(sigma_conditional), not 0;
- x0 = (1 - t) * x_t - t * v, and the conditional frames of x0 are the clean latents again;
- eps = (x_t - x0) / sigma.

Guidance is upstream's x0 form ``x0_c + g * (x0_c - x0_u)`` (both branches keep the conditional frames).
T2V is the same with no conditional frame (mask all 0).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .model import CosmosDiT
from .scheduler import RectifiedFlowAB2, device_invariant_noise, rf_scaling


class Video2World:
    def __init__(self, model: CosmosDiT, sigma_conditional: float = 1e-4, fps: float | None = None):
        self.model, self.sigma_conditional, self.fps = model, sigma_conditional, fps

    @staticmethod
    def condition_mask(latent: Tensor, num_conditional_frames: int) -> Tensor:
        """[B, 1, T, H, W]: 1 on the first ``num_conditional_frames`` latent frames."""
        B, _, T, H, W = latent.shape
        if not 0 <= num_conditional_frames <= T:
            raise ValueError(f"{num_conditional_frames} conditional frames for a {T}-frame latent")
        mask = latent.new_zeros(B, 1, T, H, W, dtype=torch.float32)
        mask[:, :, :num_conditional_frames] = 1.0
        return mask

    def denoise(self, xt: Tensor, sigma: Tensor, cross, gt: Tensor | None = None, mask: Tensor | None = None,
                padding_mask: Tensor | None = None, record: bool = False):
        """x0 prediction of x_t [B, C, T, H, W] at sigma [B] (float32); ``cross`` from ``model.prepare_cross``.
        ``record``: a dict with net_input, net_timesteps_B_T, net_output, x0, eps."""
        sig = sigma.reshape(-1, 1, 1, 1, 1).to(torch.float32)         # [B, 1, 1(T), 1, 1]
        c_skip, c_out, c_in, c_noise = rf_scaling(sig)
        net_in = xt * c_in
        if mask is not None and gt is not None:
            m = mask.expand_as(xt).type_as(net_in)
            net_in = gt.type_as(net_in) * m + net_in * (1 - m)
            c_noise_cond = rf_scaling(torch.ones_like(sig) * self.sigma_conditional)[3]
            m_t = m.mean(dim=[1, 3, 4], keepdim=True)                  # [B, 1, T, 1, 1]
            c_noise = c_noise_cond * m_t + c_noise * (1 - m_t)
        t_B_T = c_noise.reshape(c_noise.shape[0], c_noise.shape[2])
        if t_B_T.shape[1] == 1:
            t_B_T = t_B_T.expand(-1, xt.shape[2])
        net_out = self.model(net_in, t_B_T, condition_mask=mask, padding_mask=padding_mask, fps=self.fps,
                             cross=cross).float()
        x0 = c_skip * xt + c_out * net_out
        if mask is not None and gt is not None:
            x0 = gt.type_as(x0) * m + x0 * (1 - m)
        if not record:
            return x0
        return {"net_input": net_in, "net_timesteps_B_T": t_B_T, "net_output": net_out, "x0": x0,
                "eps": (xt - x0) / sig}

    @staticmethod
    def guide(x0_cond: Tensor, x0_uncond: Tensor, guidance: float) -> Tensor:
        """Upstream's x0 guidance: ``cond + g * (cond - uncond)`` (g = 0: no guidance)."""
        return x0_cond + guidance * (x0_cond - x0_uncond)

    def x0_fn(self, cond, uncond=None, guidance: float = 0.0, gt: Tensor | None = None,
              num_conditional_frames: int = 0, batched: bool = False) -> Callable[[Tensor, Tensor], Tensor]:
        """``x0_fn(x, sigma)``: the (guided) x0 prediction. ``batched`` runs the cond and uncond branches as one
        forward of twice the batch (same math; the text K/V of both prompts must have the same length)."""
        mask = None
        if num_conditional_frames:
            if gt is None:
                raise ValueError("conditional frames need their clean latents")
            mask = self.condition_mask(gt, num_conditional_frames)
        if uncond is not None and batched:
            if any(c[0].shape[1:] != u[0].shape[1:] for c, u in zip(cond, uncond)):
                batched = False  # prompts of different lengths: two forwards
            else:
                both = [(torch.cat([ck, uk]), torch.cat([cv, uv])) for (ck, cv), (uk, uv) in zip(cond, uncond)]
                gt2 = None if gt is None else torch.cat([gt, gt])
                mask2 = None if mask is None else torch.cat([mask, mask])

        def fn(x: Tensor, sigma: Tensor) -> Tensor:
            if uncond is None:
                return self.denoise(x, sigma, cond, gt, mask)
            if batched:
                x0c, x0u = self.denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), both, gt2, mask2).chunk(2)
                return self.guide(x0c, x0u, guidance)
            return self.guide(self.denoise(x, sigma, cond, gt, mask), self.denoise(x, sigma, uncond, gt, mask),
                              guidance)
        return fn

    def sample(self, x0_fn: Callable[[Tensor, Tensor], Tensor], shape, seed: int, num_steps: int = 35,
               sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, device=None,
               noise: Tensor | None = None, on_step: Callable | None = None) -> Tensor:
        """The whole rollout: noise * sigma_max, ``num_steps`` AB2 steps, the final x0 at sigma_min."""
        sched = RectifiedFlowAB2(sigma_min, sigma_max, rho)
        sched.set_timesteps(num_steps)
        if noise is None:
            noise = device_invariant_noise(shape, seed)
        sample = (noise * sigma_max).to(device=device, dtype=torch.float32)
        B = sample.shape[0]
        for i in range(num_steps):
            sigma = sched.sigmas[i].to(torch.float32).repeat(B).to(sample.device)
            x0 = x0_fn(sample, sigma)
            sample = sched.step(x0, i, sample)
            if on_step is not None:
                on_step(i, x0, sample)
        sigma = sched.sigmas[-1].to(torch.float32).repeat(B).to(sample.device)
        return x0_fn(sample, sigma)
