"""The replica scheduler's batching window against a rollout that stops while the window is open.

Regression: the batch formed before the window still named the stopped rollout, popping its withdrawn request
raised KeyError, the pump ended, and the other rollouts of that batch waited for their blocks forever (the
50-client soak hung). The model is replaced by a stub step: this is about the futures, not the frames."""
from __future__ import annotations

import asyncio
import itertools

from engine.registry import Registry
from engine.spec import load_spec

SPEC = "tiny_self_forcing"


class StubPacer:
    def due(self) -> float:
        return 0.0


class StubRollout:
    """What the scheduler reads of a rollout: its pacer, its age (``seq``), its session, whether it will ask."""
    _seq = itertools.count()

    def __init__(self, name: str, asks_soon: bool = False):
        self.name, self.seq, self.pacer, self.session = name, next(self._seq), StubPacer(), name
        self.asks_soon = asks_soon

    def wants_block(self, by: float) -> bool:
        return self.asks_soon


def test_a_rollout_that_stops_inside_the_batching_window_leaves_the_others_served():
    from flashdreams_cli.serve.sessions import Replica, stream_source

    registry = Registry.default()
    replica = Replica(0, stream_source(load_spec(SPEC), registry), registry, max_batch=8)
    replica._step = lambda sessions: [(0, f"frames of {s}", 1.0) for s in sessions]
    replica._last_batch_s = 0.25                    # a window of 0.05 s opens for the late rollout below

    async def go():
        a, b, late = StubRollout("a"), StubRollout("b"), StubRollout("late", asks_soon=True)
        replica.rollouts.update({a, b, late})         # `late` is live but has not asked yet: the window opens
        ask_a = asyncio.ensure_future(replica.run_block(a))
        ask_b = asyncio.ensure_future(replica.run_block(b))
        await asyncio.sleep(0.01)                     # the pump has formed [a, b] and waits for `late`
        assert replica.withdraw(a)                    # a stops inside the window
        got_b = await asyncio.wait_for(ask_b, timeout=5)
        assert ask_a.cancelled()
        assert got_b == (0, "frames of b", 1.0)
        # the pump is still alive and serves the next request
        got_late = await asyncio.wait_for(replica.run_block(late), timeout=5)
        assert got_late == (0, "frames of late", 1.0)
        assert not replica._pump_task.done()

    async def main():
        try:
            await go()
        finally:
            replica.shutdown()

    asyncio.run(main())
