"""`fd serve`'s "save" and "branch from here": session snapshots (engine/snapshot.py) kept per rollout.

A client saves the world at a block boundary and later branches from any saved point, optionally under a
new prompt: the rollout's session is restored to that snapshot and goes on from its block, as a new
session id (like a reset, so frames of the abandoned branch are dropped by the page). Snapshots stay in
host memory on the server, a few per rollout (the oldest is dropped), and die with the rollout: a KV
cache is large, and nothing a client sends is written to the server's disk.
"""
from __future__ import annotations

from collections import OrderedDict

from .protocol import ProtocolError

MAX_SAVES = 4


class SavedPoints:
    def __init__(self, limit: int = MAX_SAVES):
        self.limit = limit
        self.points: OrderedDict[int, object] = OrderedDict()
        self._next = 0

    def save(self, session) -> tuple[int, int]:
        """Snapshot ``session`` now; returns (save number, block it continues from)."""
        snap = session.snapshot()
        self._next += 1
        self.points[self._next] = snap
        while len(self.points) > self.limit:
            self.points.popitem(last=False)
        return self._next, int(snap.header["block"])

    def branch(self, session, number: int, prompt: str | None = None) -> int:
        """Restore ``session`` to save ``number`` (under ``prompt`` when given); returns its block."""
        if number not in self.points:
            have = ", ".join(map(str, self.points)) or "none"
            raise ProtocolError(f"branch: no saved point {number} (saved: {have}; at most {self.limit} are kept)")
        session.restore(self.points[number], **({} if prompt is None else {"prompt": prompt}))
        return session.block
