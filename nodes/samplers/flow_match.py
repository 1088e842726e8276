"""Self-Forcing's flow-matching table: the 1000-entry sigma/timestep schedule and its lookups.

Self-Forcing (and Causal-Forcing, which copies it) never evaluates sigma(t) by formula:
every conversion looks the timestep up in a fixed table built once by
``FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True).set_timesteps(1000, training=True)``
and takes ``sigmas[argmin |timesteps - t|]``. Warped denoising steps are entries of the same
table, so the lookups land exactly on them. To match the goldens bit for bit the table is
built with the same float32 torch ops in the same order, and ``flow_to_x0`` uses the float64
lookup of ``WanDiffusionWrapper._convert_flow_pred_to_x0`` while ``add_noise`` uses the
float32 one of ``FlowMatchScheduler.add_noise``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class FlowMatchTable:
    """The shifted linear sigma table, with warp and sigma lookups that accept tensors of any shape.

    Tables live on the CPU; lookups on another device use a cached copy there, so a
    per-frame ``t`` on the GPU costs no host sync.
    """

    def __init__(self, shift: float, num_steps: int = 1000, num_train_timesteps: int = 1000,
                 sigma_max: float = 1.0, sigma_min: float = 0.0, extra_one_step: bool = True):
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        sigma_start = sigma_min + (sigma_max - sigma_min) * 1.0  # denoising_strength 1
        if extra_one_step:
            s = torch.linspace(sigma_start, sigma_min, num_steps + 1)[:-1]
        else:
            s = torch.linspace(sigma_start, sigma_min, num_steps)
        s = shift * s / (1 + (shift - 1) * s)
        self.sigmas: Tensor = s
        self.timesteps: Tensor = s * num_train_timesteps
        # Training-time loss weights; kept because the goldens pin them and trainers read them.
        y = torch.exp(-2 * ((self.timesteps - num_steps / 2) / num_steps) ** 2)
        y = y - y.min()
        self.linear_timesteps_weights: Tensor = y * (num_steps / y.sum())
        self._on_device: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def warp(self, step_list: Sequence[int]) -> Tensor:
        """Map integer steps (1000 = pure noise) to table timesteps: ``cat(timesteps, [0])[1000 - list]``."""
        ext = torch.cat((self.timesteps, torch.zeros(1, dtype=self.timesteps.dtype)))
        return ext[len(self.timesteps) - torch.as_tensor(step_list, dtype=torch.long)]

    def _tables(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (torch.device(device), dtype)
        if key not in self._on_device:
            self._on_device[key] = (self.timesteps.to(device, dtype), self.sigmas.to(device, dtype))
        return self._on_device[key]

    def index_of(self, t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Table index nearest to each entry of ``t`` (first on ties), compared in ``dtype``."""
        timesteps, _ = self._tables(t.device, dtype)
        return (timesteps - t.to(dtype).unsqueeze(-1)).abs().argmin(dim=-1)

    def sigma_at(self, t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``sigmas[argmin |timesteps - t|]`` with the shape of ``t``; float64 is what x0 conversion uses."""
        _, sigmas = self._tables(t.device, dtype)
        return sigmas[self.index_of(t, dtype)]

    @staticmethod
    def _expand(sigma: Tensor, x: Tensor) -> Tensor:
        return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``(1 - sigma) x0 + sigma noise``; ``t`` covers the leading dims of ``x0`` ([N] or [B, f])."""
        sigma = self._expand(self.sigma_at(t, torch.float32), x0)
        return ((1 - sigma) * x0 + sigma * noise).type_as(noise)

    def flow_to_x0(self, x_t: Tensor, flow: Tensor, t: Tensor) -> Tensor:
        """``x_t - sigma flow`` in float64, cast back to the flow's dtype (the wrapper's x0 conversion)."""
        sigma = self._expand(self.sigma_at(t, torch.float64), x_t)
        return (x_t.double() - sigma * flow.double()).to(flow.dtype)

    def scalar_sigmas(self, t: float) -> tuple[float, float]:
        """Host-side (add_noise sigma, flow_to_x0 sigma) for one timestep, for plans made ahead of a loop."""
        tt = torch.tensor([t], dtype=torch.float32)
        return float(self.sigma_at(tt, torch.float32)), float(self.sigma_at(tt, torch.float64))
