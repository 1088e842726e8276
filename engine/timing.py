"""Per-node timing: CUDA events on GPU (no sync inside a block), perf counters on CPU."""
from __future__ import annotations

import time


class NodeTimer:
    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")
        self._start = self._end = None
        self._t0 = self._t1 = 0.0

    def start(self) -> None:
        if self.cuda:
            import torch
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._end.record()
        else:
            self._t1 = time.perf_counter()

    def ms(self) -> float:
        """Elapsed milliseconds; on CUDA this waits for the end event (call after the block)."""
        if self.cuda:
            self._end.synchronize()
            return float(self._start.elapsed_time(self._end))
        return (self._t1 - self._t0) * 1e3
