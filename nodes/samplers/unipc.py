"""Flow-matching UniPC multistep and plain Euler: Wan 2.1's samplers, and Cosmos-Predict2.5's UniPC.

Mirrors ``FlowUniPCMultistepScheduler`` (wan/utils/fm_solvers_unipc.py) as wan/text2video.py
drives it: built with shift 1 (so the base sigmas are the unshifted linear ones), then
``set_timesteps(N, shift=s)`` shifts an N-point linspace between the base sigma_max and
sigma_min. Only the configuration Wan uses is implemented: flow prediction, predict_x0,
bh2, solver_order 2, lower_order_final, no thresholding, final sigma 0. Scalar coefficients
are float32 CPU tensors computed the way upstream does, so a step issues only elementwise
device kernels (no host sync) and stays within float32 rounding of the reference.

Cosmos-Predict2.5 drives a copy of the same scheduler (cosmos_predict2/_src/predict2/models/fm_solvers_unipc.py,
same update rules) over another schedule: with ``use_kerras_sigma`` its ``set_timesteps`` takes EDM's Karras
sigmas (200 -> 0.01, rho 7, N + 1 points), maps them onto the flow path with ``s / (1 + s)`` and keeps all
N + 1 of them, so it makes N + 1 model calls for N steps and ignores ``shift``. ``karras_flow_schedule`` builds
that table and ``set_schedule`` runs the one solver on any (timesteps, sigmas) pair.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def shifted_flow_schedule(num_steps: int, shift: float, num_train_timesteps: int = 1000,
                          base_shift: float = 1.0) -> tuple[Tensor, Tensor]:
    """(timesteps int64 [N] truncated, sigmas float32 [N+1] ending in 0), as Wan's set_timesteps.

    ``base_shift`` is the shift given at construction (Wan passes 1): it bends the training
    table whose first entry becomes sigma_max. numpy float64 linspace on purpose: torch's
    linspace rounds differently in the last bit, which can flip an int64 truncation.
    """
    base = 1.0 - np.linspace(1, 1 / num_train_timesteps, num_train_timesteps)[::-1]
    base = torch.from_numpy(base.copy()).to(torch.float32)
    base = base_shift * base / (1 + (base_shift - 1) * base)
    sigma_max, sigma_min = base[0].item(), base[-1].item()
    s = np.linspace(sigma_max, sigma_min, num_steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    timesteps = torch.from_numpy(s * num_train_timesteps).to(torch.int64)
    sigmas = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
    return timesteps, sigmas


def karras_flow_schedule(num_steps: int, sigma_min: float = 0.01, sigma_max: float = 200.0, rho: float = 7.0,
                         num_train_timesteps: int = 1000) -> tuple[Tensor, Tensor]:
    """(timesteps int64 [N+1] truncated, sigmas float32 [N+2] ending in 0): EDM's Karras sigmas in float64
    numpy, as flow sigmas ``s / (1 + s)``, as Cosmos-Predict2.5's ``set_timesteps(use_kerras_sigma=True)``."""
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = np.arange(num_steps + 1) / num_steps
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    edm = (hi + ramp * (lo - hi)) ** rho
    s = edm / (1 + edm)
    timesteps = torch.from_numpy(s * num_train_timesteps).to(torch.int64)
    sigmas = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
    return timesteps, sigmas


def _lambda(sigma: Tensor) -> Tensor:
    """Log-SNR of the flow path x = (1 - sigma) x0 + sigma noise (float32 scalar)."""
    return torch.log(1 - sigma) - torch.log(sigma)


class _FlowSchedule:
    """Shared schedule state: ``set_timesteps`` then one ``step`` per model evaluation."""

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift
        self.timesteps: Tensor | None = None
        self.sigmas: Tensor | None = None
        self.step_index = 0

    def set_timesteps(self, num_steps: int, shift: float | None = None) -> None:
        self.set_schedule(*shifted_flow_schedule(
            num_steps, self.shift if shift is None else shift, self.num_train_timesteps, self.shift))

    def set_schedule(self, timesteps: Tensor, sigmas: Tensor) -> None:
        """Any table: one model call per entry of ``timesteps`` [N] (int64), ``sigmas`` [N+1] float32 ending in
        the final sigma (0), e.g. ``karras_flow_schedule``."""
        if sigmas.ndim != 1 or timesteps.ndim != 1 or len(sigmas) != len(timesteps) + 1:
            raise ValueError(f"need sigmas [N+1] for timesteps [N], got {tuple(sigmas.shape)}, "
                             f"{tuple(timesteps.shape)}")
        self.timesteps, self.sigmas = timesteps, sigmas.to(torch.float32)
        self.step_index = 0
        self._reset()

    def _reset(self) -> None:
        pass

    def _begin(self, t) -> None:
        """Upstream finds the first step index from ``t``; a caller that starts mid-schedule relies on it."""
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps before step")
        on_host = not isinstance(t, Tensor) or (t.device.type == "cpu" and t.numel() == 1)
        if self.step_index == 0 and t is not None and on_host:
            hits = (self.timesteps == int(t)).nonzero().flatten().tolist()
            if hits:
                self.step_index = hits[1] if len(hits) > 1 else hits[0]


class FlowUniPC(_FlowSchedule):
    """UniPC-bh2 multistep predictor-corrector in x0 form, order <= 2 (Wan's sampler)."""

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, solver_order: int = 2,
                 lower_order_final: bool = True, disable_corrector: tuple[int, ...] = ()):
        if solver_order not in (1, 2):
            raise ValueError("only solver_order 1 or 2 (Wan uses 2)")
        super().__init__(num_train_timesteps, shift)
        self.solver_order = solver_order
        self.lower_order_final = lower_order_final
        self.disable_corrector = tuple(disable_corrector)
        self._reset()

    def _reset(self) -> None:
        self.x0_history: list[Tensor] = []  # converted model outputs, newest last (<= solver_order)
        self.last_sample: Tensor | None = None
        self.lower_order_nums = 0
        self.this_order = 1

    def _coeffs(self, i_t: int, i_s0: int):
        """(sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * B_h, h, lambda_s0) between two indices."""
        sigma_t, sigma_s0 = self.sigmas[i_t], self.sigmas[i_s0]
        alpha_t = 1 - sigma_t
        lambda_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lambda_s0
        h_phi_1 = torch.expm1(-h)
        return sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * torch.expm1(-h), h, lambda_s0

    def _rk(self, i: int, h: Tensor, lambda_s0: Tensor) -> Tensor:
        return (_lambda(self.sigmas[i]) - lambda_s0) / h

    def _predict(self, sample: Tensor, order: int) -> Tensor:
        k = self.step_index
        ratio, a_phi, a_bh, h, lambda_s0 = self._coeffs(k + 1, k)
        m0 = self.x0_history[-1]
        x_t = ratio * sample - a_phi * m0
        if order == 2:
            d1 = (self.x0_history[-2] - m0) / self._rk(k - 1, h, lambda_s0)
            x_t = x_t - a_bh * (0.5 * d1)
        return x_t.to(sample.dtype)

    def _correct(self, x0_now: Tensor, sample: Tensor, order: int) -> Tensor:
        k = self.step_index
        ratio, a_phi, a_bh, h, lambda_s0 = self._coeffs(k, k - 1)
        m0 = self.x0_history[-1]
        x_t = ratio * self.last_sample - a_phi * m0
        d1_t = x0_now - m0
        if order == 1:
            return (x_t - a_bh * (0.5 * d1_t)).to(sample.dtype)
        rk = self._rk(k - 2, h, lambda_s0)
        rhos = self._rhos_c(h, rk)
        corr = rhos[0] * ((self.x0_history[-2] - m0) / rk)
        return (x_t - a_bh * (corr + rhos[1] * d1_t)).to(sample.dtype)

    @staticmethod
    def _rhos_c(h: Tensor, rk: Tensor) -> Tensor:
        """Order-2 corrector weights: solve [[1, 1], [rk, 1]] rho = b (the bh2 phi-function moments)."""
        hh = -h
        b_h = torch.expm1(hh)
        h_phi_k = torch.expm1(hh) / hh - 1
        b, fact = [], 1
        for i in (1, 2):
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        rks = torch.tensor([float(rk), 1.0])
        R = torch.stack([torch.pow(rks, 0), torch.pow(rks, 1)])
        return torch.linalg.solve(R, torch.tensor([float(x) for x in b]))

    def step(self, model_output: Tensor, t, sample: Tensor) -> Tensor:
        """One solver step: corrector on ``sample`` (from step 1 on), then the predictor to the next sigma."""
        self._begin(t)
        k = self.step_index
        x0 = sample - self.sigmas[k] * model_output
        if k > 0 and (k - 1) not in self.disable_corrector and self.last_sample is not None:
            sample = self._correct(x0, sample, self.this_order)
        self.x0_history = (self.x0_history + [x0])[-self.solver_order:]
        order = self.solver_order
        if self.lower_order_final:
            order = min(order, len(self.timesteps) - k)
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = sample
        prev = self._predict(sample, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, self.solver_order)
        self.step_index += 1
        return prev


class FlowEuler(_FlowSchedule):
    """First-order flow sampler on the same schedule: x <- x + (sigma_next - sigma) v."""

    def step(self, model_output: Tensor, t, sample: Tensor) -> Tensor:
        self._begin(t)
        k = self.step_index
        dsigma = self.sigmas[k + 1] - self.sigmas[k]
        self.step_index += 1
        return (sample + dsigma * model_output).to(sample.dtype)


class UniPCIntTable:
    """The int64 timestep table of ``set_timesteps(num_steps, shift)`` used as a few-step AR schedule
    (LingBot-World's WanI2VFast: its timesteps are entries of this table, picked by index).

    The int table repeats values, so the sigma depends on the lookup, as upstream:
    - x0 conversion: ``sigmas[argmin |timesteps - t|]`` (the FIRST entry with that value), float64;
    - re-noise (``index_for_timestep``): the SECOND entry of a repeated value (else the only one), float32.
    Same interface as ``FlowMatchTable`` for ``ARSchedule``: ``warp``, ``scalar_sigmas``,
    ``num_train_timesteps``.
    """

    def __init__(self, shift: float, num_steps: int = 1000, num_train_timesteps: int = 1000):
        self.shift, self.num_train_timesteps = shift, num_train_timesteps
        self.timesteps, self.sigmas = shifted_flow_schedule(num_steps, shift, num_train_timesteps)

    def warp(self, step_list) -> Tensor:
        """Steps (1000 = pure noise) to table timesteps: ``timesteps[num_train_timesteps - step]`` (e.g.
        [1000, 821, 642, 321] -> indices [0, 179, 358, 679]); 0 maps to timestep 0."""
        ext = torch.cat((self.timesteps, torch.zeros(1, dtype=self.timesteps.dtype)))
        idx = self.num_train_timesteps - torch.as_tensor(step_list, dtype=torch.long)
        if (idx < 0).any() or (idx >= len(ext)).any():
            raise ValueError(f"steps must lie in [0, {self.num_train_timesteps}], got {list(step_list)}")
        return ext[idx].float()

    def index_x0(self, t: float) -> int:
        return int((self.timesteps.double() - float(t)).abs().argmin())

    def index_noise(self, t: float) -> int:
        hit = (self.timesteps == int(round(float(t)))).nonzero().flatten()
        if len(hit) == 0:
            return self.index_x0(t)
        return int(hit[1] if len(hit) > 1 else hit[0])

    def scalar_sigmas(self, t: float) -> tuple[float, float]:
        """Host-side (add_noise sigma, flow_to_x0 sigma) for one timestep."""
        if float(t) <= 0:
            return 0.0, 0.0
        return float(self.sigmas[self.index_noise(t)]), float(self.sigmas.double()[self.index_x0(t)])
