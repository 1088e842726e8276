"""Autoregressive block sampler of Self-Forcing / Causal-Forcing, independent of the model.

Per block of ``frames_per_block`` latent frames (pipeline/causal_inference.py):

    x = noise of the block
    for each planned t_i:  flow = denoise(x, t_i, frame_start); x0 = x - sigma(t_i) flow
                           if not last: x = (1 - sigma(t_{i+1})) x0 + sigma(t_{i+1}) draw
    denoise(x0, context_noise, frame_start)      # rewrites the block's KV rows, output unused
    emit x0

The causal model keeps its KV cache behind ``denoise``: every call of a block writes the
same cache rows at ``frame_start``, and the context pass leaves the clean block's K/V there
for the next block to attend to. The rollout never touches the cache. ``denoise`` is either
a plain callable ``(x, t [B, f] tensor, frame_start) -> flow`` (parity tests replay records
through it) or a ``CausalStream`` (nodes/common/causal.py): then denoising calls go to
``stream.denoise(x, t, frame_start, **conditions)`` with the host timestep, the context and
image passes to ``stream.commit``, and ``step(noise, **conditions)`` forwards the block's
conditions by name.

I2V (Causal-Forcing ``initial_latent``): before block 0 the image latent is passed at t=0 in
chunks of ``frames_per_block`` from frame 0 (its output is unused); generated frames then
start after it, and ``run_all`` prepends the image latent to the result.

Diffusion-forcing teacher (``ARSchedule.unipc``, OmniDreams' teacher): each block is solved by the
UniPC multistep ODE over ``set_timesteps(N, shift)`` (no re-noise draws), then the context pass as
above (its draw, when ``context_noise > 0``, is the only one of the block after the block's noise).

Wan 2.2 (two experts, ``ARSchedule.boundary``): high-noise steps convert to x at the boundary and
re-noise with add_noise_high (``_denoise_two_experts``); ``first_block_frames`` gives block 0 its
own length (FastVideo's MoE path: 1 frame).

Randomness, in call order, exactly where upstream calls ``torch.randn_like``: one draw per
re-noise, i.e. after every denoise step but the last of each block, plus one per context
pass when ``context_noise > 0`` (the training pipeline's re-noising; upstream inference
only runs context_noise 0, where nothing is drawn). Each draw has the shape
``[B * f, C, H, W]`` (upstream flattens batch and frames); injected draws are reshaped to
the block. By default draws come from a ``torch.Generator`` on the latents' device seeded
with ``seed``; seed it and draw the initial noise from it first (``initial_noise``) to
follow upstream's global-RNG order (noise, then re-noise draws).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor

from nodes.ar.schedule import ARSchedule, StepPlan
from nodes.common.causal import BlockCall, CausalStream, call_stream

# denoise(x [B, f, C, H, W], t [B, f] float32, frame_start) -> flow [B, f, C, H, W]
Denoiser = Callable[[Tensor, Tensor, int], Tensor]


@dataclass(frozen=True)
class CallTrace:
    """What one denoiser call saw and returned (for parity tests and debugging)."""
    index: int
    kind: str               # "image" | "denoise" | "context"
    block: int | None       # generated block index (None for image passes)
    step: int | None        # step within the block (denoise calls only)
    x: Tensor
    t: Tensor
    frame_start: int
    flow: Tensor | None     # None for a stream's commit (context / image) passes
    x0: Tensor | None       # denoise calls only


def drive_together(blocks: list, run_calls: Callable[[list[int], list[BlockCall]], list]) -> list[Tensor]:
    """Run several rollouts' ``block_calls`` generators in lockstep: each round takes every unfinished
    rollout's next call, hands calls of the same kind to ``run_calls(indices, calls)`` at once (it returns
    one result per call, in order), and sends the results back. Returns each block's clean latents, in input order."""
    pending = {i: next(g) for i, g in enumerate(blocks)} if blocks else {}
    done: dict[int, Tensor] = {}
    while pending:
        for commit in sorted({c.is_commit for c in pending.values()}):
            ids = [i for i, c in pending.items() if c.is_commit == commit]
            results = run_calls(ids, [pending[i] for i in ids])
            for i, r in zip(ids, results):
                try:
                    pending[i] = blocks[i].send(r)
                except StopIteration as end:
                    done[i] = end.value
                    del pending[i]
    return [done[i] for i in range(len(blocks))]


def initial_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[Tensor, torch.Generator]:
    """Initial noise from a fresh generator, returned with it so re-noise draws continue the stream."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=dtype), g


class ARRollout:
    """Streaming block sampler: ``step()`` generates one block, ``run_all()`` the whole video."""

    def __init__(self, denoise: Denoiser | CausalStream, schedule: ARSchedule, frames_per_block: int,
                 noise: Tensor | None = None, *, initial_latent: Tensor | None = None,
                 draws: Iterable[Tensor] | None = None, generator: torch.Generator | None = None,
                 seed: int = 0, trace: Callable[[CallTrace], None] | None = None,
                 first_block_frames: int | None = None):
        """``noise`` [B, F, C, H, W] with F a multiple of ``frames_per_block`` (or None when every
        ``step`` gets its block's noise). ``draws`` replaces the generator (recorded draws).
        ``first_block_frames``: generated block 0 has this many frames (Wan 2.2 MoE: 1); then the
        noise holds 1 + (F - first) // frames_per_block blocks and its last frames that make no whole
        block are never denoised (upstream drops them too)."""
        self.first_frames = frames_per_block if first_block_frames is None else int(first_block_frames)
        if not 1 <= self.first_frames:
            raise ValueError(f"first_block_frames must be >= 1, got {first_block_frames}")
        if noise is not None and self.first_frames == frames_per_block and noise.shape[1] % frames_per_block:
            raise ValueError(f"{noise.shape[1]} noise frames is not a multiple of {frames_per_block}")
        if noise is not None and noise.shape[1] < self.first_frames:
            raise ValueError(f"{noise.shape[1]} noise frames cannot hold a first block of {self.first_frames}")
        if initial_latent is not None and initial_latent.shape[1] % frames_per_block:
            raise ValueError("initial_latent frames must be a multiple of frames_per_block")
        self.denoise = denoise
        self.stream = denoise if isinstance(denoise, CausalStream) else None
        self._conditions: dict = {}
        self.schedule = schedule
        self.nfpb = frames_per_block
        self.noise = noise
        self.initial_latent = initial_latent
        self._draws: Iterator[Tensor] | None = iter(draws) if draws is not None else None
        self._generator = generator
        self.seed = seed
        self.trace = trace
        self.block_index = 0
        self.num_calls = 0
        self.num_draws = 0
        self._primed = initial_latent is None
        self._t_cache: dict[tuple, Tensor] = {}

    @property
    def first_frame(self) -> int:
        """Absolute frame index of generated block 0 (after any image/video prefix)."""
        return 0 if self.initial_latent is None else self.initial_latent.shape[1]

    @property
    def num_blocks(self) -> int | None:
        if self.noise is None:
            return None
        return 1 + (self.noise.shape[1] - self.first_frames) // self.nfpb

    def block_frames(self, block: int) -> int:
        return self.first_frames if block == 0 else self.nfpb

    def block_offset(self, block: int) -> int:
        """Frames generated before ``block`` (from generated block 0)."""
        return 0 if block == 0 else self.first_frames + (block - 1) * self.nfpb

    def _timestep(self, value: float, like: Tensor) -> Tensor:
        key = (value, like.shape[:2], like.device)
        if key not in self._t_cache:
            self._t_cache[key] = torch.full(like.shape[:2], value, dtype=torch.float32, device=like.device)
        return self._t_cache[key]

    def _draw(self, like: Tensor) -> Tensor:
        self.num_draws += 1
        if self._draws is not None:
            return next(self._draws).to(like.device, like.dtype).reshape(like.shape)
        if self._generator is None:
            self._generator = torch.Generator(device=like.device).manual_seed(self.seed)
        flat = (like.shape[0] * like.shape[1],) + tuple(like.shape[2:])
        return torch.randn(flat, generator=self._generator, device=like.device,
                           dtype=like.dtype).reshape(like.shape)

    def _invoke(self, call: "BlockCall") -> Tensor | None:
        """One model call, alone (``step``); a batched driver makes these for many rollouts at once."""
        if self.stream is None:
            return self.denoise(call.x, self._timestep(call.t, call.x), call.frame_start)
        return call_stream(self.stream, call)

    def _call(self, kind: str, x: Tensor, t_value: float, frame_start: int, block: int | None = None,
              step: int | None = None, sigma_x0: float | None = None):
        """Ask for one model call (yielded as a ``BlockCall``; the driver sends the flow back)."""
        flow = yield BlockCall(kind, x, t_value, frame_start, self._conditions)
        x0 = None
        if sigma_x0 is not None:
            x0 = (x.double() - sigma_x0 * flow.double()).to(flow.dtype)
        if self.trace is not None:
            self.trace(CallTrace(self.num_calls, kind, block, step, x, self._timestep(t_value, x), frame_start,
                                 flow, x0))
        self.num_calls += 1
        return flow, x0

    def _prime(self) -> None:
        """Image/video prefix passes at t=0 (upstream passes int64 zeros; the value is what matters)."""
        lat = self.initial_latent
        for f0 in range(0, lat.shape[1], self.nfpb):
            chunk = lat[:, f0:f0 + self.nfpb]
            yield from self._call("image", chunk, 0.0, f0)
        self._primed = True

    @staticmethod
    def _renoise(x0: Tensor, draw: Tensor, sigma: float) -> Tensor:
        return ((1 - sigma) * x0 + sigma * draw).to(draw.dtype)

    def step(self, noise_block: Tensor | None = None, **conditions) -> Tensor:
        """Generate the next block; returns its clean latents [B, nfpb, C, H, W]. ``conditions`` go to a
        stream's calls by name (per-block camera, actions, ...)."""
        calls = self.block_calls(noise_block, **conditions)
        try:
            call = next(calls)
            while True:
                call = calls.send(self._invoke(call))
        except StopIteration as done:
            return done.value

    def block_calls(self, noise_block: Tensor | None = None, **conditions):
        """The next block as a generator of ``BlockCall``s: send each call's flow (None for a commit) back,
        and the block's clean latents come out as the StopIteration value. ``step`` drives it alone;
        ``drive_together`` drives several rollouts in lockstep so one batched forward serves them all."""
        b = self.block_index
        self._conditions = conditions
        if noise_block is None:
            if self.noise is None or b >= self.num_blocks:
                raise IndexError(f"no noise for block {b}")
            off = self.block_offset(b)
            noise_block = self.noise[:, off:off + self.block_frames(b)]
        if not self._primed:
            yield from self._prime()
        plan: StepPlan = self.schedule.for_block(b)
        frame_start = self.first_frame + self.block_offset(b)
        if self.schedule.unipc is not None:
            x0 = yield from self._solve_unipc(noise_block, frame_start, b)
        elif self.schedule.boundary is not None:
            x0 = yield from self._denoise_two_experts(noise_block, plan, frame_start, b)
        else:
            x, x0 = noise_block, None
            for i, t in enumerate(plan.t):
                _, x0 = yield from self._call("denoise", x, t, frame_start, b, i, plan.sigma_x0[i])
                if i + 1 < len(plan):
                    x = self._renoise(x0, self._draw(x0), plan.sigma_noise[i + 1])
        ctx_t = self.schedule.context_t
        ctx_x = x0 if ctx_t <= 0 else self._renoise(x0, self._draw(x0), self.schedule.context_sigma_noise)
        yield from self._call("context", ctx_x, ctx_t, frame_start, b)
        self.block_index += 1
        return x0

    def _solve_unipc(self, x: Tensor, frame_start: int, b: int) -> Tensor:
        """The diffusion-forcing teacher (``ARSchedule.unipc``): UniPC multistep from the block's noise,
        one denoise call per schedule timestep (the int64 value as the model's t), no draws."""
        solver = self.schedule.unipc.solver()
        for i, t in enumerate(solver.timesteps.tolist()):
            sigma = float(solver.sigmas[i])
            flow, _ = yield from self._call("denoise", x, float(t), frame_start, b, i, sigma)
            x = solver.step(flow.float(), int(t), x.float())
        return x

    def _denoise_two_experts(self, x: Tensor, plan: StepPlan, frame_start: int, b: int) -> Tensor:
        """Wan 2.2's trajectory (``ARSchedule.boundary``): high-noise steps predict x at the boundary
        and re-noise with add_noise_high; the last high step hands x_b on as is (its draw is taken and
        unused, as upstream); low-noise steps are Self-Forcing's."""
        bound = self.schedule.boundary
        x0 = None
        for i, t in enumerate(plan.t):
            high = bound.is_high(t)
            sigma = plan.sigma_x0[i] - bound.sigma_x0 if high else plan.sigma_x0[i]
            _, x0 = yield from self._call("denoise", x, t, frame_start, b, i, sigma)
            if i + 1 < len(plan):
                draw = self._draw(x0)
                if high and bound.is_high(plan.t[i + 1]):
                    alpha, beta = bound.alpha_beta(plan.sigma_noise[i + 1])
                    x = (alpha * x0 + beta * draw).to(draw.dtype)
                elif high:
                    x = x0
                else:
                    x = self._renoise(x0, draw, plan.sigma_noise[i + 1])
        return x0

    def run_all(self) -> Tensor:
        """Every remaining block concatenated along frames; from block 0 the initial latent comes first."""
        if self.noise is None:
            raise ValueError("run_all needs the full noise tensor")
        out = [] if self.initial_latent is None or self.block_index > 0 else [self.initial_latent.to(self.noise.dtype)]
        while self.block_index < self.num_blocks:
            out.append(self.step())
        return torch.cat(out, dim=1)
