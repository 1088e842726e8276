"""Ctrl-C during ``fd exec``: the first one stops after the block in flight, so the sinks close normally and
what was generated so far lands as a playable file (atomically, like any finished run); a second Ctrl-C
aborts at once and discards the partial outputs.

Stopping between blocks rather than inside one matters: an interrupt raised in the middle of a sink's write
or a node's KV-cache update leaves nothing safe to finish, which is why the engine aborts on exceptions.
"""
from __future__ import annotations

import contextlib
import signal
import threading


class StopRequest:
    def __init__(self, on_first=None):
        self.requested = False
        self._on_first = on_first

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self._on_first is not None:
            self._on_first()


@contextlib.contextmanager
def stop_after_block(on_first=None):
    """Within the block, the first SIGINT only sets ``.requested``; the handler is restored on exit."""
    stop = StopRequest(on_first)
    if threading.current_thread() is not threading.main_thread():
        yield stop                         # signals reach the main thread only: nothing to install
        return
    old = signal.signal(signal.SIGINT, stop._handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, old)
