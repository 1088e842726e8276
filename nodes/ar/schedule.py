"""The static plan of an autoregressive few-step rollout: which timesteps each block visits.

Self-Forcing and Causal-Forcing denoise every block with the same short list of warped
FlowMatch timesteps (Causal-Forcing++ gives the first generated block its own, longer list)
and then rewrite the block's KV cache with one "context" pass at ``context_noise``. All of
that is fixed before sampling starts, so the per-step sigmas are looked up here, once, on
the host; the rollout loop then never reads a device value back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from nodes.samplers.flow_match import FlowMatchTable


@dataclass(frozen=True)
class StepPlan:
    """One block's denoising trajectory.

    ``t``: model timesteps (float32 values). ``sigma_noise``: the float32 table sigma that
    re-noising to ``t[i]`` uses (add_noise). ``sigma_x0``: the float64 table sigma that
    turns the flow predicted at ``t[i]`` into x0.
    """
    t: tuple[float, ...]
    sigma_noise: tuple[float, ...]
    sigma_x0: tuple[float, ...]

    @classmethod
    def from_timesteps(cls, table: FlowMatchTable, timesteps: Sequence[float]) -> "StepPlan":
        pairs = [table.scalar_sigmas(float(t)) for t in timesteps]
        return cls(tuple(float(t) for t in timesteps),
                   tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))

    def __len__(self) -> int:
        return len(self.t)


@dataclass(frozen=True)
class Boundary:
    """Wan 2.2 two-expert trajectory (FastVideo ``CausalDMDDenosingStage`` with ``boundary_ratio``).

    A step at ``t >= t`` (the boundary timestep) belongs to the high-noise expert, whose flow is
    turned into x at the boundary, ``x_t - (sigma_t - sigma_b) flow``, not x0; re-noising between two
    high steps is ``alpha x_b + beta noise`` with alpha = (1 - sigma') / (1 - sigma_b),
    beta = sqrt(sigma'^2 - (alpha sigma_b)^2) (add_noise_high), and the last high step hands x_b to
    the low-noise expert unchanged (its draw is still taken). ``sigma_b`` is the table entry nearest
    the boundary timestep (argmin, as upstream), not the formula's value.
    """
    t: float                  # boundary timestep = boundary_ratio * num_train_timesteps
    sigma_noise: float        # float32 table sigma at t (add_noise_high)
    sigma_x0: float           # the same entry in float64 (x_b conversion)

    @classmethod
    def build(cls, table: FlowMatchTable, ratio: float) -> "Boundary":
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"boundary_ratio must lie in (0, 1), got {ratio}")
        t = float(ratio) * table.num_train_timesteps
        return cls(t, *table.scalar_sigmas(t))

    def is_high(self, t: float) -> bool:
        return t >= self.t

    def alpha_beta(self, sigma_next: float) -> tuple[float, float]:
        """add_noise_high's coefficients, computed in float32 as upstream."""
        s = torch.tensor(sigma_next, dtype=torch.float32)
        b = torch.tensor(self.sigma_noise, dtype=torch.float32)
        alpha = (1 - s) / (1 - b)
        beta = torch.sqrt(s ** 2 - (alpha * b) ** 2)
        return float(alpha), float(beta)


@dataclass(frozen=True)
class UniPCSolve:
    """The diffusion-forcing teacher's block solve (OmniDreams' teacher, FlashDreams
    ``FlowMatchUniPCScheduler``): each block runs the deterministic UniPC-bh2 multistep ODE
    (order 2, lower-order final) over ``set_timesteps(num_steps, shift)`` from pure noise, with
    no re-noise draws; the network sees the schedule's int64 timesteps. The context pass
    re-noises with the schedule's sigma nearest ``context_noise`` (for 35 steps at shift 5 the
    last step is t = 128) and passes ``context_noise`` itself, as FlashDreams' ``add_noise``."""
    num_steps: int
    shift: float

    def solver(self):
        from nodes.samplers.unipc import FlowUniPC
        s = FlowUniPC(shift=1.0)              # base table unshifted; the inference schedule takes the shift
        s.set_timesteps(self.num_steps, shift=self.shift)
        return s

    def context_sigma(self, t: float) -> float:
        s = self.solver()
        if float(t) <= 0:
            return 0.0
        i = int((s.timesteps.double() - float(t)).abs().argmin())
        return float(s.sigmas[i])


@dataclass(frozen=True)
class ARSchedule:
    """Step plans per block plus the context pass (timestep and, when > 0, its re-noise sigma).
    ``boundary``: the Wan 2.2 two-expert trajectory (None: Self-Forcing's, every step to x0).
    ``unipc``: every block is solved by UniPC instead (the plans are then unused)."""
    first: StepPlan          # block 0 (the first generated block; after the image in I2V)
    rest: StepPlan           # every later block
    context_t: float
    context_sigma_noise: float
    boundary: Boundary | None = None
    unipc: UniPCSolve | None = None

    @classmethod
    def build(cls, table: FlowMatchTable, steps: Sequence[int],
              first_chunk_steps: Sequence[int] | None = None, warp: bool = True,
              context_noise: float = 0.0, boundary_ratio: float | None = None,
              unipc_steps: int | None = None) -> "ARSchedule":
        """Plan from config step lists (e.g. [1000, 750, 500, 250]).

        ``warp`` maps them through the table (``warp_denoising_step``, true in every
        released config); otherwise the integers are used as timesteps directly.
        """
        def plan(s: Sequence[int]) -> StepPlan:
            ts = table.warp(s).tolist() if warp else [float(x) for x in s]
            return StepPlan.from_timesteps(table, ts)

        rest = plan(steps)
        first = plan(first_chunk_steps) if first_chunk_steps is not None else rest
        bound = None if boundary_ratio is None else Boundary.build(table, boundary_ratio)
        if unipc_steps is not None:
            if bound is not None:
                raise ValueError("unipc_steps (a UniPC solve per block) cannot be combined with boundary_ratio")
            solve = UniPCSolve(int(unipc_steps), float(table.shift))
            return cls(first, rest, float(context_noise), solve.context_sigma(context_noise), None, solve)
        return cls(first, rest, float(context_noise), table.scalar_sigmas(float(context_noise))[0], bound)

    def for_block(self, block: int) -> StepPlan:
        return self.first if block == 0 else self.rest
