"""An independent reference for the attention window of a causal Wan DiT: which frames a block
attends to and at which RoPE positions, recomputed from scratch on every call.

``ExplicitWindow`` stands in for ``SelfKVCache`` behind ``WanDiT.forward_causal`` (the DiT only
calls ``plan``, ``device_rows``, ``write`` and ``keys_values`` on its cache). It shares no code
with nodes/common/kv_cache.py or nodes/common/rope.py: it un-rotates every key the DiT writes back
to its pre-RoPE value (its own complex-number RoPE, float64), keeps one entry per (layer, frame) -
the latest write wins, as a block's context pass overwrites its denoising calls - and on every
read lists the attended frames and rotates each key at the position the mode defines
(docs/streaming.md, "RoPE modes"):

- attended frames after a block ending at frame ``end``: the sink ``[0, min(sink, end))`` and the
  window ``[oldest, end)`` with ``oldest = max(sink, end - (window - sink))`` (``window`` counts the
  sink too); with no window, every frame so far;
- ``absolute``: every key at its own frame index;
- ``relative``: window keys at their own frame index; sink frame ``j`` at ``oldest - sink + j``,
  i.e. the sink renumbered to sit right before the oldest window frame. Before any eviction
  ``oldest == sink`` and this is ``absolute``.

Queries are rotated by the DiT itself at absolute positions (covered by the upstream goldens).
"""
from __future__ import annotations

import torch


def rope_angles(head_dim: int, t: torch.Tensor, h: torch.Tensor, w: torch.Tensor, theta: float = 10000.0):
    """[L, head_dim/2] float64 angles of tokens at (t, h, w): Wan splits the D/2 rotation pairs into
    time c - 2(c//3), height c//3, width c//3 (c = D/2); pair j of an axis with n pairs turns at
    theta^(-j/n) per unit of position."""
    c = head_dim // 2
    parts = []
    for pos, n in ((t, c - 2 * (c // 3)), (h, c // 3), (w, c // 3)):
        freq = theta ** (-torch.arange(n, dtype=torch.float64) / n)
        parts.append(pos.double()[:, None] * freq[None])
    return torch.cat(parts, 1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D] (pairs (2i, 2i+1) as complex numbers) turned by angles [L, D/2]; float64."""
    xc = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    turn = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    return torch.view_as_real(xc * turn).flatten(-2)


class ExplicitWindow:
    """A from-scratch stand-in for SelfKVCache (see the module doc)."""

    def __init__(self, head_dim: int, grid: tuple[int, int], *, sink_frames: int = 0,
                 window_frames: int | None = None, rope_mode: str = "absolute"):
        assert rope_mode in ("absolute", "relative")
        self.head_dim, self.grid = head_dim, grid
        self.frame_tokens = grid[0] * grid[1]
        self.sink, self.window, self.mode = sink_frames, window_frames, rope_mode
        self.keys: dict[tuple[int, int], torch.Tensor] = {}    # (layer, frame) -> pre-RoPE k [B, ft, H, D]
        self.values: dict[tuple[int, int], torch.Tensor] = {}
        self.reads: list[dict[int, int]] = []                  # per keys_values call: frame -> position

    def _angles(self, frame_pos: float) -> torch.Tensor:
        gh, gw = self.grid
        h = torch.arange(gh).repeat_interleave(gw)
        w = torch.arange(gw).repeat(gh)
        return rope_angles(self.head_dim, torch.full((gh * gw,), float(frame_pos)), h, w)

    # the part of SelfKVCache's interface WanDiT uses
    def plan(self, frame_start: int, num_frames: int) -> tuple[int, int]:
        return frame_start, num_frames

    def device_rows(self, plan):
        return None

    def write(self, layer, plan, k, v, rows=None) -> None:
        start, n = plan
        ft = self.frame_tokens
        for i in range(n):
            f = start + i
            self.keys[layer, f] = rotate(k[:, i * ft:(i + 1) * ft], -self._angles(f))   # back to pre-RoPE
            self.values[layer, f] = v[:, i * ft:(i + 1) * ft]

    def positions(self, end: int) -> dict[int, int]:
        """Attended frame -> its RoPE frame position, for a block ending at frame ``end``."""
        if self.window is None:
            return {f: f for f in range(end)}
        s = self.sink
        oldest = max(s, end - (self.window - s))
        sink = range(min(s, end))
        pos = {j: (oldest - s + j if self.mode == "relative" else j) for j in sink}
        pos.update({f: f for f in range(oldest, end)})
        return pos

    def keys_values(self, layer, plan, rows=None):
        start, n = plan
        pos = self.positions(start + n)
        if layer == 0:
            self.reads.append(pos)
        ks = [rotate(self.keys[layer, f], self._angles(p)) for f, p in pos.items()]
        vs = [self.values[layer, f] for f in pos]
        like = vs[0]
        return torch.cat(ks, 1).to(like.dtype), torch.cat(vs, 1)
