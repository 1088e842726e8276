"""The causal-model contract: what a ``causal_denoiser`` edge carries into ``ar.sampler``.

A block-autoregressive sampler needs very little from a model, and this is all of it:

    stream = model.open_stream(StreamSpec(...))     # one session: its KV cache(s), its CUDA graphs
    stream.set_conditions(text=emb)                 # session conditions; again on a prompt switch
    flow = stream.denoise(x, t, frame_start, **block_conditions)   # one denoising call
    stream.commit(x0, t, frame_start, **block_conditions)          # the context pass: cache the block

``x`` is a block of latent frames [B, f, C, H, W] starting at absolute frame ``frame_start``;
``t`` is the block's timestep as a host float (the schedule is static, so a model may pick an
expert or a graph by it without reading anything back from the device). Per-block conditions
(camera rays, actions, low-res video features, HD-map latents) travel by name: a model lists the
ones it takes in ``block_conditions`` and the sampler forwards exactly those. Every denoising
call of a block rewrites the same cache rows; ``commit`` leaves the clean block there for the
blocks after it. How a model lays out its cache, shards it over a context-parallel group or
replays its calls as CUDA graphs is its own business.

Serving several sessions of one model at once (``fd serve``): ``model.run_together(streams, calls)``
takes one ``BlockCall`` per session's stream and returns one result per call. The default runs them
one after the other; a model that can batch them into one forward overrides it, and must return
exactly (bit for bit) what the one-by-one calls return: a session's frames may not depend on who
else is being served.

``TimestepExperts`` composes models that split the noise range between them (Wan 2.2's high-
and low-noise experts): each expert keeps its own cache, ``denoise`` goes to the expert owning
``t``, and ``commit`` writes the clean block into every expert's cache.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch


@dataclass(frozen=True)
class StreamSpec:
    """What a session asks of a causal model's cache."""
    frame_shape: tuple[int, int, int]       # latent (C, H, W) of one frame
    frames_per_block: int
    batch: int = 1
    sink_frames: int = 0
    window_frames: int | None = None        # frames kept, sink included; None: every frame up to max_frames
    max_frames: int | None = None
    rope_mode: str = "absolute"
    graphs: bool = False                    # replay calls as CUDA graphs (the planner's decision and the spec's)


@dataclass(frozen=True)
class BlockCall:
    """One call a session's rollout makes of its stream: ``denoise`` returns the flow; ``context`` and
    ``image`` passes are commits (nothing returned)."""
    kind: str               # "image" | "denoise" | "context"
    x: torch.Tensor         # [B, f, C, H, W]
    t: float                # host timestep
    frame_start: int
    conditions: dict        # the block's conditions, by name

    @property
    def is_commit(self) -> bool:
        return self.kind != "denoise"


def call_stream(stream: "CausalStream", call: BlockCall):
    """``call`` on one stream alone."""
    if call.is_commit:
        return stream.commit(call.x, call.t, call.frame_start, **call.conditions)
    return stream.denoise(call.x, call.t, call.frame_start, **call.conditions)


class CausalStream(abc.ABC):
    """One session of a causal model: its cache, its conditions, its captured graphs."""

    @abc.abstractmethod
    def set_conditions(self, **conditions: Any) -> None:
        """Session conditions (``text``, ...); called before the first block and on every switch."""

    @abc.abstractmethod
    def denoise(self, x: torch.Tensor, t: float, frame_start: int, **block: Any) -> torch.Tensor:
        """x [B, f, C, H, W] at timestep t -> predicted flow, same shape (float32)."""

    def commit(self, x: torch.Tensor, t: float, frame_start: int, **block: Any) -> None:
        """The context pass: write the (clean or lightly noised) block into the cache."""
        self.denoise(x, t, frame_start, **block)

    def prepare(self, x: torch.Tensor, first_frame: int = 0, **block: Any) -> int:
        """Capture ahead of block 0 every graph a rollout of blocks shaped like ``x`` needs; returns how many."""
        return 0

    def reset(self) -> None:
        """Forget every cached frame (a new session reuses this stream, its buffers and graphs)."""

    def graph_status(self) -> str:
        return "eager"

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The cached frames (KV rows, summaries: whatever the stream keeps between blocks) for a session
        snapshot; conditions are not included (the sampler sets them again from its inputs)."""
        raise NotImplementedError(f"{type(self).__name__} does not support session snapshots")

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a snapshot's ``state_tensors`` back in place (buffers keep their addresses for the graphs)."""
        raise NotImplementedError(f"{type(self).__name__} does not support session snapshots")


def copy_state_into(buffers: dict[str, torch.Tensor | None], tensors: dict[str, torch.Tensor], what: str) -> None:
    """Copy snapshot tensors into live buffers of the same names, shapes and dtypes, else a ValueError that
    names the field (a snapshot of another latent size, window or dtype)."""
    live = {k: b for k, b in buffers.items() if b is not None}
    if set(live) != set(tensors):
        raise ValueError(f"{what}: the snapshot holds {sorted(tensors)}, this session {sorted(live)}")
    for k, b in live.items():
        t = tensors[k]
        if tuple(t.shape) != tuple(b.shape) or t.dtype != b.dtype:
            raise ValueError(f"{what}.{k}: {tuple(t.shape)} {t.dtype} in the snapshot, {tuple(b.shape)} {b.dtype} "
                             "here (another latent size, window, batch or dtype)")
    for k, b in live.items():
        b.copy_(tensors[k])


class CausalModel(abc.ABC):
    """A loaded causal DiT, as a ``causal_denoiser`` edge hands it on."""

    session_conditions: ClassVar[tuple[str, ...]] = ("text",)
    block_conditions: ClassVar[tuple[str, ...]] = ()
    required_conditions: ClassVar[tuple[str, ...]] = ("text",)

    @property
    @abc.abstractmethod
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @abc.abstractmethod
    def patch_grid(self) -> tuple[int, int]:
        """(ph, pw): latent height and width must be multiples of these."""

    @abc.abstractmethod
    def open_stream(self, spec: StreamSpec) -> CausalStream:
        """A fresh session: allocate its cache (this model's layout, dtype, device and parallel group)."""

    def run_together(self, streams: Sequence[CausalStream], calls: Sequence[BlockCall]) -> list:
        """One call per session stream (all denoise, or all commits), one result each. Default: one by one.
        An override may batch them but must return bit for bit what the one-by-one calls return."""
        return [call_stream(s, c) for s, c in zip(streams, calls)]


class TimestepExperts(CausalModel):
    """Experts that split the noise range: ``experts`` are (lowest timestep it takes, model), the
    highest-noise expert first; the last expert takes everything below. Dispatch is ``t >= bound``."""

    def __init__(self, experts: Sequence[tuple[float, CausalModel]]):
        if not experts:
            raise ValueError("TimestepExperts needs at least one expert")
        bounds = [b for b, _ in experts]
        if bounds != sorted(bounds, reverse=True):
            raise ValueError(f"expert bounds must decrease from the high-noise expert: {bounds}")
        self.experts = list(experts)
        first = self.experts[0][1]
        self.session_conditions = first.session_conditions
        self.block_conditions = tuple(dict.fromkeys(c for _, m in experts for c in m.block_conditions))
        self.required_conditions = first.required_conditions

    @property
    def device(self) -> torch.device:
        return self.experts[0][1].device

    @property
    def dtype(self) -> torch.dtype:
        return self.experts[0][1].dtype

    def patch_grid(self) -> tuple[int, int]:
        return self.experts[0][1].patch_grid()

    def pick(self, t: float) -> int:
        for i, (bound, _) in enumerate(self.experts):
            if t >= bound:
                return i
        return len(self.experts) - 1

    def open_stream(self, spec: StreamSpec) -> "ExpertStreams":
        return ExpertStreams(self, [m.open_stream(spec) for _, m in self.experts])

    def run_together(self, streams, calls) -> list:
        """Denoise calls go to each call's expert (batched per expert); commits to every expert, low first."""
        out: list = [None] * len(calls)
        if not all(isinstance(s, ExpertStreams) for s in streams):
            return super().run_together(streams, calls)
        if calls and calls[0].is_commit:
            for e in reversed(range(len(self.experts))):
                self.experts[e][1].run_together([s.streams[e] for s in streams], calls)
            return out
        for e in range(len(self.experts)):
            ids = [i for i, c in enumerate(calls) if self.pick(c.t) == e]
            if ids:
                res = self.experts[e][1].run_together([streams[i].streams[e] for i in ids], [calls[i] for i in ids])
                for i, r in zip(ids, res):
                    out[i] = r
        return out


class ExpertStreams(CausalStream):
    """One stream (and cache) per expert."""

    def __init__(self, model: TimestepExperts, streams: list[CausalStream]):
        self.model, self.streams = model, streams

    def set_conditions(self, **conditions: Any) -> None:
        for s in self.streams:
            s.set_conditions(**conditions)

    def denoise(self, x, t, frame_start, **block):
        return self.streams[self.model.pick(t)].denoise(x, t, frame_start, **block)

    def commit(self, x, t, frame_start, **block) -> None:
        for s in reversed(self.streams):  # low-noise expert first, as FastVideo's context pass
            s.commit(x, t, frame_start, **block)

    def prepare(self, x, first_frame: int = 0, **block) -> int:
        return sum(s.prepare(x, first_frame, **block) for s in self.streams)

    def reset(self) -> None:
        for s in self.streams:
            s.reset()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"expert{i}.{k}": t for i, s in enumerate(self.streams) for k, t in s.state_tensors().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, s in enumerate(self.streams):
            prefix = f"expert{i}."
            s.load_state_tensors({k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)})

    def graph_status(self) -> str:
        return "; ".join(f"expert {i}: {s.graph_status()}" for i, s in enumerate(self.streams))
