"""Block-by-block TAEHV decoding for autoregressive video.

Two modes:

- ``"exact"``: the per-MemBlock memory (each MemBlock's input at the last frame
  decoded) is carried in the state, so decoding the latents block by block
  gives exactly the frames of one full decode (upstream ``decode_video``), with
  upstream's ``frames_to_trim`` leading frames dropped once, on the first block.
- ``"demo"``: what Self-Forcing's demo.py does: decode every block from fresh
  memory, warmed up on the previous ``context_latents`` latents, and keep only
  the new frames. Cheaper to reason about but an approximation: a MemBlock's
  receptive field is longer than 3 latent frames, so it drifts from the full
  decode from the second block on. Kept because reference outputs record it.

Speed knobs (all off by default, results equal up to bf16 rounding): ``fused``
(sub-pixel upsample steps, ``model.run_layers``), ``compile`` (torch.compile of
the whole block decode, default mode) and ``graphs`` (CUDA: every block after
the first replays a captured graph; in exact mode the MemBlock memory goes in
and out as graph tensors, so it never needs fixed addresses).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.capture import GraphCache
from nodes.common.conv import cudnn_autotune

from .model import TAEHV, MemBlock, Memory

MODES = ("exact", "demo")


@dataclass
class TAEHVStreamState:
    memory: Memory | None = None          # exact mode: MemBlock index -> last input frame
    context: torch.Tensor | None = None   # demo mode: the last latents decoded [N, k, C, h, w]
    blocks_decoded: int = 0


class StreamingTAEHVDecoder:
    def __init__(self, model: TAEHV, mode: str = "exact", frames_to_trim: int | None = None,
                 context_latents: int = 3, signed_output: bool = False, fused: bool = False,
                 compile: bool = False, graphs: bool = False, autotune: bool = True):
        """``frames_to_trim`` defaults to the model's (3: the first latent's 4 frames -> 1).

        ``context_latents`` is the demo mode's warm-up length. ``signed_output``
        maps the nominal [0, 1] frames to [-1, 1] (``*2 - 1``, as the demo's
        diffusers-style wrapper does).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model = model
        self.mode = mode
        self.frames_to_trim = model.frames_to_trim if frames_to_trim is None else frames_to_trim
        self.context_latents = context_latents
        self.signed_output = signed_output
        self.fused = fused
        self.autotune = autotune  # scoped cudnn.benchmark around every decode
        self._decode = torch.compile(self._decode_eager, dynamic=False) if compile else self._decode_eager
        self._keys: tuple[int, ...] | None = None  # MemBlock indices, in the order the graphs pass them
        device = next(model.parameters()).device
        self.graphs = GraphCache(self._graph_fn, device, enabled=graphs, name="taehv")

    def _decode_eager(self, x: torch.Tensor, *memory: torch.Tensor):
        """(frames, *new memory) from latents and the memory tensors in ``self._keys`` order."""
        mem = dict(zip(self._keys, memory)) if memory else None
        y, new = self.model.decode_chunk(x, mem, fused=self.fused)
        if self.signed_output:
            y = y * 2 - 1
        return (y, *[new[k] for k in self._keys])

    def _graph_fn(self, x: torch.Tensor, *memory: torch.Tensor):
        return self._decode(x, *memory)

    def _run(self, x: torch.Tensor, memory: Memory | None) -> tuple[torch.Tensor, Memory]:
        if self._keys is None:
            self._keys = tuple(i for i, layer in enumerate(self.model.decoder) if isinstance(layer, MemBlock))
        if memory is None and self.mode == "exact":  # explicit zeros: the first block shares the graphs
            memory = self.model.zero_memory(x)
        mem = () if memory is None else tuple(memory[k] for k in self._keys)
        with cudnn_autotune(self.autotune):
            return self._dispatch(x, mem)

    def _dispatch(self, x: torch.Tensor, mem: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, Memory]:
        if mem and self.graphs.enabled:
            y, *new = self.graphs((tuple(x.shape), x.dtype), x, *mem)
        elif not mem and self.graphs.enabled and self.mode == "demo":
            y, *new = self.graphs((tuple(x.shape), x.dtype, "fresh"), x)
        else:
            y, *new = self._decode(x, *mem)
        return y, dict(zip(self._keys, new))

    def graph_status(self) -> str:
        return self.graphs.status()

    def new_state(self) -> TAEHVStreamState:
        return TAEHVStreamState()

    @torch.no_grad()
    def decode(self, state: TAEHVStreamState, latents: torch.Tensor) -> torch.Tensor:
        """Decode one block of latents [N, T, C, h, w] -> new frames [N, F, 3, 8h, 8w]; updates ``state``.

        F is ``4T`` (``4T - frames_to_trim`` on the first block).
        """
        w = self.model.decoder[1].weight
        latents = latents.to(device=w.device, dtype=w.dtype)
        if self.mode == "exact":
            frames, state.memory = self._run(latents, state.memory)
            drop = self.frames_to_trim if state.blocks_decoded == 0 else 0
        else:
            x = latents if state.context is None else torch.cat([state.context, latents], 1)
            frames, _ = self._run(x, None)
            drop = self.frames_to_trim if state.context is None else self.model.t_upscale * state.context.shape[1]
            state.context = x[:, -self.context_latents:]
        state.blocks_decoded += 1
        return frames[:, drop:]


def save_state(state: TAEHVStreamState) -> dict:
    """A session snapshot's view of the decoder memory (engine/snapshot.py): MemBlock inputs or demo context."""
    out: dict = {"blocks_decoded": state.blocks_decoded, "memory_keys": sorted(state.memory or {})}
    out.update({f"memory.{k}": t for k, t in (state.memory or {}).items()})
    if state.context is not None:
        out["context"] = state.context
    return out


def load_state(state: TAEHVStreamState, values: dict, device) -> TAEHVStreamState:
    state.blocks_decoded = int(values["blocks_decoded"])
    keys = values.get("memory_keys", [])
    state.memory = {int(k): values[f"memory.{k}"].to(device, copy=True) for k in keys} if keys else None
    state.context = values["context"].to(device, copy=True) if "context" in values else None
    return state
