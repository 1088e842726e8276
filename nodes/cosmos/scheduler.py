"""Cosmos' sampler: Karras sigmas and a 2-step Adams-Bashforth solver in x0 / log-sigma form.

As ``RectifiedFlowAB2Scheduler`` drives ``Video2WorldPipeline``:

- ``N + 1`` sigmas ``(smax^(1/rho) + i/N (smin^(1/rho) - smax^(1/rho)))^rho`` in float64, the last one
  sigma_min (there is no step to 0);
- the start is ``noise * sigma_max`` with the noise drawn by numpy (``RandomState(seed).standard_normal``,
  float32), so it does not depend on the device;
- step 0 is an Euler step in x0 form, later steps the 2-AB update with lambda = -log(sigma) and the phi
  functions, all in float64 and cast back to the sample's dtype;
- after the last step one more x0 prediction at sigma_min is the result.

``rf_scaling`` is the rectified-flow preconditioning that turns a sigma into the network's input scale and
timestep: t = sigma / (sigma + 1), c_skip = c_in = 1 - t, c_out = -t, c_noise = t.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device=None) -> Tensor:
    """The N + 1 float64 sigmas from sigma_max down to sigma_min."""
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    i = torch.arange(num_steps + 1, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + i / num_steps * (lo - hi)) ** rho


def device_invariant_noise(shape, seed: int, dtype=torch.float32, device=None) -> Tensor:
    """Standard normal noise from numpy's legacy RandomState(seed), float32 first (upstream's arch_invariant_rand)."""
    arr = np.random.RandomState(seed).standard_normal(tuple(shape)).astype(np.float32)
    return torch.from_numpy(arr).to(device=device, dtype=dtype)


def rf_scaling(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of rectified flow with sigma_data 1."""
    t = sigma / (sigma + 1)
    return 1.0 - t, -t, 1.0 - t, t


def _phi1(z: Tensor) -> Tensor:
    return torch.expm1(z) / z


def _phi2(z: Tensor) -> Tensor:
    return (_phi1(z) - 1.0) / z


class RectifiedFlowAB2:
    """``set_timesteps(N)`` then ``step(x0_pred, i, sample)`` for i = 0..N-1 (the solver keeps the previous x0)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.sigmas: Tensor | None = None
        self.timesteps: Tensor | None = None
        self.x0_prev: Tensor | None = None

    def set_timesteps(self, num_steps: int, device=None) -> Tensor:
        self.sigmas = karras_sigmas(num_steps, self.sigma_min, self.sigma_max, self.rho, device)
        self.timesteps = torch.arange(num_steps, dtype=torch.long, device=device)
        self.x0_prev = None
        return self.timesteps

    def step(self, x0_pred: Tensor, i: int, sample: Tensor) -> Tensor:
        """The sample at sigmas[i + 1] from the sample and its x0 prediction at sigmas[i]."""
        if self.sigmas is None:
            raise RuntimeError("call set_timesteps before step")
        s = self.sigmas
        x, x0 = sample.double(), x0_pred.double()
        if self.x0_prev is None:  # Euler in x0 form
            s_t, s_n = s[i], s[i + 1]
            out = (s_t - s_n) / s_t * x0 + s_n / s_t * x
        else:
            lam_t, lam_n, lam_p = -torch.log(s[i]), -torch.log(s[i + 1]), -torch.log(s[i - 1])
            dt = lam_n - lam_t
            c2 = (lam_p - lam_t) / dt
            phi1, phi2 = _phi1(-dt), _phi2(-dt)
            b1 = torch.nan_to_num(phi1 - 1.0 / c2 * phi2, nan=0.0)
            b2 = torch.nan_to_num(1.0 / c2 * phi2, nan=0.0)
            out = torch.exp(-dt) * x + dt * (b1 * x0 + b2 * self.x0_prev)
        self.x0_prev = x0
        return out.to(sample.dtype)
