"""A progress bar while a checkpoint's tensors load.

Loading a 14B DiT takes tens of seconds, and a silent wait looks like a hang, so a
person at a terminal gets a bar. Nobody else does: logs, CI and tests stay quiet,
because a bar is drawn only when stderr is an interactive console. A caller that
wants the counts anyway (a server reporting load status, a test) passes a callback
and receives ``(label, done, total)`` whatever the console.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

ProgressCallback = Callable[[str, int, int], None]


def interactive() -> bool:
    """True when stderr is a terminal a person watches."""
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


@contextlib.contextmanager
def load_progress(label: str, callback: ProgressCallback | None = None) -> Iterator[Callable[[int, int], None] | None]:
    """Yields ``advance(done, total)`` for ``load_into(progress=...)``, or None when nobody would see it."""
    if callback is None and not interactive():
        yield None
        return
    bar = _RichBar(label) if interactive() else None
    try:
        def advance(done: int, total: int) -> None:
            if bar is not None:
                bar.update(done, total)
            if callback is not None:
                callback(label, done, total)
        yield advance
    finally:
        if bar is not None:
            bar.close()


class _RichBar:
    """One transient rich bar on stderr (rich is imported only when a bar is drawn)."""

    def __init__(self, label: str):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        self.task = self.progress.add_task(f"loading {label}", total=None)
        self.progress.start()

    def update(self, done: int, total: int) -> None:
        self.progress.update(self.task, completed=done, total=total)

    def close(self) -> None:
        self.progress.stop()
