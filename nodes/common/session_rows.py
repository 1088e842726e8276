"""Several sessions in one DiT forward: which batch rows belong to which session's KV cache.

Serving batches the blocks of concurrent sessions (``fd serve``): their tokens go through every
projection, norm and MLP as one batch, which is where the FLOPs are. Self-attention cannot be
one call: each session sits at its own position (its own frame_start, RoPE rows and attended
length) in its own cache. ``SessionRows`` does that part per session: rows ``[a, a + n)`` write
their K/V into their session's cache at its plan and attend to it, with exactly the call a
session running alone makes - so the result does not depend on the batch.

Why own caches rather than one cache stacked on a batch dimension: positions differ (users join
at any block), so a stacked attention would need padding and a mask, whose kernels reduce in
another order (not bit-identical), and a leaving session would leave a hole to compact. With
own caches a session joins or leaves a batch between blocks with no copy at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .fp8 import QuantizedRows
from .kv_cache import BlockPlan, DeviceRows, SelfKVCache


@dataclass(frozen=True)
class SessionPart:
    start: int                 # first batch row of this session
    rows: int                  # its batch rows (the session's own batch, usually 1)
    cache: SelfKVCache
    plan: BlockPlan
    device_rows: DeviceRows | None = None


class SessionRows:
    """The sessions of one batched call, in batch-row order."""

    def __init__(self, parts: list[SessionPart]):
        self.parts = parts

    @property
    def size(self) -> int:
        return sum(p.rows for p in self.parts)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x`` [B, ...] cut into each session's rows."""
        return [x[p.start:p.start + p.rows] for p in self.parts]

    def each(self, fn: Callable[..., torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
        """``fn`` per session, concatenated: for the small GEMMs and convolutions whose kernels a CPU BLAS
        picks by batch size (time embedding, patch embedding, head), which would otherwise round differently."""
        return torch.cat([fn(*parts) for parts in zip(*(self.split(x) for x in xs))])

    def self_attention(self, q, k, v, attend: Callable) -> torch.Tensor | QuantizedRows:
        """q/k/v [B, L, H, D] (post-RoPE): each session's rows through ``attend(q, k, v, part)``, the model's own
        single-session call (it writes and attends that session's cache), concatenated in batch-row order. FP8
        attention handing e4m3 rows on (QuantizedRows) is concatenated as such."""
        out = [attend(qs, ks, vs, p) for p, qs, ks, vs in zip(self.parts, self.split(q), self.split(k), self.split(v))]
        return QuantizedRows.cat(out) if isinstance(out[0], QuantizedRows) else torch.cat(out)


def batch_bucket(n: int, buckets: tuple[int, ...] = (1, 2, 4, 8)) -> int:
    """The batch-size bucket ``n`` sessions run in (a captured graph per bucket): the smallest that holds them."""
    for b in buckets:
        if n <= b:
            return b
    return n
