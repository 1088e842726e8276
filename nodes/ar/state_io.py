"""`ar.sampler`'s session state as a snapshot sees it (engine/snapshot.py), and back.

Saved: the model stream's cache (through the causal-model contract, so any model that implements
``state_tensors`` gets snapshots), the RNG generator's state, the rollout's counters, the pre-drawn
noise of a global cache, and the recache history. Not saved: the conditions, because the sampler sets
them again from its inputs (the restored prompt, or a new one) when it re-opens the stream.

Restoring is deferred to the first block after it: only then does the sampler have its ``model``
input to open a stream with. ``apply`` runs right after that opening.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from .switch import ContextRecord

COUNTERS = ("block_index", "num_calls", "num_draws")


def save(state) -> dict[str, Any]:
    if state.rollout is None:
        return {"started": False}
    r = state.rollout
    out: dict[str, Any] = {"started": True, "primed": r._primed, "prompt_switches": state.prompt_switches,
                           "generator": state.generator.get_state()}
    out.update({k: getattr(r, k) for k in COUNTERS})
    out["conditions"] = digest(state.conditions)
    if state.noise is not None:
        out["noise"] = state.noise
    out.update({f"stream.{k}": t for k, t in state.stream.state_tensors().items()})
    out["history"] = [[rec.t, rec.frame_start, sorted(rec.conditions)] for rec in state.history]
    for i, rec in enumerate(state.history):
        out[f"history.{i}.x"] = rec.x
        out.update({f"history.{i}.{name}": v for name, v in rec.conditions.items()})
    return out


def digest(conditions: dict) -> str:
    """A fingerprint of the session conditions (prompt embeddings, ...): a restore under other ones is a switch."""
    h = hashlib.sha256()
    for name in sorted(conditions):
        t = conditions[name]
        h.update(name.encode())
        if t is not None:
            t = t.detach().to("cpu").contiguous()
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def apply(state, values: dict[str, Any], node: str) -> None:
    """Put saved values into a state whose stream was just opened (and generator just seeded)."""
    r, dev = state.rollout, state.model.device
    for k in COUNTERS:
        setattr(r, k, int(values[k]))
    r._primed = bool(values["primed"])
    state.prompt_switches = int(values["prompt_switches"])
    state.generator.set_state(values["generator"])
    if (state.noise is None) != ("noise" not in values):
        raise ValueError(f"node {node!r}: the snapshot's noise does not match this sampler's cache mode "
                         "(window_frames null vs set)")
    if state.noise is not None:
        if values["noise"].shape != state.noise.shape:
            raise ValueError(f"node {node!r}: snapshot noise {tuple(values['noise'].shape)}, this session "
                             f"{tuple(state.noise.shape)} (another num_blocks, batch or latent size)")
        state.noise.copy_(values["noise"])
    try:
        state.stream.load_state_tensors({k[len("stream."):]: t for k, t in values.items() if k.startswith("stream.")})
    except ValueError as e:
        raise ValueError(f"node {node!r}: {e}") from None
    state.history = [ContextRecord(values[f"history.{i}.x"].to(dev, copy=True), float(t), int(f0),
                                   {c: _on(values[f"history.{i}.{c}"], dev) for c in conds})
                     for i, (t, f0, conds) in enumerate(values.get("history", []))]


def _on(value, device):
    """A saved block condition back on the device (JSON conditions, e.g. a camera list, stay as they are)."""
    return value.to(device) if isinstance(value, torch.Tensor) else value
