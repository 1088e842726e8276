"""What `ar.sampler` does to its cache when the prompt (a session condition) changes between blocks.

- ``keep`` (default): only the conditions change; the cached frames keep the K/V the old prompt
  gave them, so the video continues smoothly, and the old prompt can leak into new frames.
- ``recache``: the context pass is run again over every block the cache still holds, in order, at
  its own frame index, with the new prompt, on a cleared cache (LongLive's remedy for that leak).
  The sampler keeps what each context pass committed (``ContextRecord``) while the cache holds it.
  With a global cache, or before a window has wrapped, this is exactly the cache a rollout of the
  same committed latents under the new prompt would hold. Once a window has evicted frames, the
  evicted ones are gone and the blocks re-committed first see empty rows where later frames are
  re-written after them.
- ``reset``: the sampler starts over as a new session with the new prompt would (cache cleared,
  block 0, the seed's noise again); the session's block counter and the decoder's memory go on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

MODES = ("keep", "recache", "reset")


@dataclass
class ContextRecord:
    """One context (or image-prefix) pass as it reached the model: enough to run it again."""
    x: torch.Tensor
    t: float
    frame_start: int
    conditions: dict[str, Any] = field(default_factory=dict)

    @property
    def frame_end(self) -> int:
        return self.frame_start + self.x.shape[1]


def retained(history: list[ContextRecord], sink_frames: int, window_frames: int | None) -> list[ContextRecord]:
    """The records with at least one frame the cache still holds (all of them with a global cache)."""
    if window_frames is None or not history:
        return history
    end = max(r.frame_end for r in history)
    oldest_in_ring = end - (window_frames - sink_frames)
    return [r for r in history if r.frame_start < sink_frames or r.frame_end > oldest_in_ring]


def recache(stream, history: list[ContextRecord]) -> int:
    """Clear ``stream``'s cache and commit every record again, oldest first (its conditions already set to the
    new prompt). Returns the number of passes."""
    stream.reset()
    with torch.no_grad():
        for r in history:
            stream.commit(r.x, r.t, r.frame_start, **r.conditions)
    return len(history)
