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
class ARSchedule:
    """Step plans per block plus the context pass (timestep and, when > 0, its re-noise sigma)."""
    first: StepPlan          # block 0 (the first generated block; after the image in I2V)
    rest: StepPlan           # every later block
    context_t: float
    context_sigma_noise: float

    @classmethod
    def build(cls, table: FlowMatchTable, steps: Sequence[int],
              first_chunk_steps: Sequence[int] | None = None, warp: bool = True,
              context_noise: float = 0.0) -> "ARSchedule":
        """Plan from config step lists (e.g. [1000, 750, 500, 250]).

        ``warp`` maps them through the table (``warp_denoising_step``, true in every
        released config); otherwise the integers are used as timesteps directly.
        """
        def plan(s: Sequence[int]) -> StepPlan:
            ts = table.warp(s).tolist() if warp else [float(x) for x in s]
            return StepPlan.from_timesteps(table, ts)

        rest = plan(steps)
        first = plan(first_chunk_steps) if first_chunk_steps is not None else rest
        return cls(first, rest, float(context_noise), table.scalar_sigmas(float(context_noise))[0])

    def for_block(self, block: int) -> StepPlan:
        return self.first if block == 0 else self.rest
