"""Which LQ frames each FlashVSR block needs, and a buffer that hands them out as they arrive.

Upstream v1.1 (``flashvsr_tiny_long.py``) streams the LQ video through the DiT in chunks:
the first DiT call makes 6 latent frames from LQ frames [0, 25) (the projector is primed
with frame 0, then eats 4 frames per latent frame), every later call 2 latent frames from
the next 8. The decoder lags by one latent frame's worth of frames (4): the first chunk
decodes to LQ frames [0, 21) (the fresh decoder drops 3 of 24), chunk k >= 1 to
[8k + 13, 8k + 21). The video is first padded with 4 copies of its last frame and cut to
the largest 8n + 1 frames, so a video of T frames gives ``(T + 3) // 8 - 2`` chunks and
``8 * chunks + 13`` output frames (the last few input frames may be dropped, as upstream).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChunkSchedule:
    first_latents: int = 6       # latent frames of the first DiT call (upstream asserts 6)
    latents: int = 2             # latent frames of every later call
    frames_per_latent: int = 4   # the Wan VAE's temporal factor
    tail_pad: int = 4            # copies of the last frame appended to a finite video

    def lq_range(self, block: int) -> tuple[int, int]:
        """LQ frames [a, b) the DiT (its LQ projector) consumes at ``block``."""
        first = 1 + self.frames_per_latent * self.first_latents
        if block == 0:
            return 0, first
        step = self.frames_per_latent * self.latents
        a = first + step * (block - 1)
        return a, a + step

    def cond_range(self, block: int) -> tuple[int, int]:
        """LQ frames [a, b) the decoder is conditioned on at ``block`` = the frames of its output."""
        a, b = self.lq_range(block)
        lag = self.frames_per_latent
        return (0 if block == 0 else a - lag), b - lag

    def blocks_for(self, frames: int) -> int:
        """Chunks a finite video of ``frames`` frames gives (0 when too short for one)."""
        if frames <= 0:
            return 0
        n, avail = 0, frames + self.tail_pad
        while self.lq_range(n)[1] <= avail:
            n += 1
        return n

    @property
    def min_frames(self) -> int:
        """The shortest video that gives one chunk."""
        return max(1, self.lq_range(0)[1] - self.tail_pad)


class LQBuffer:
    """Prepared LQ frames (uint8 [H, W, 3]) in arrival order, handed out block by block.

    Holds only what a later block still needs: the current DiT window and the decoder's lag.
    """

    def __init__(self, schedule: ChunkSchedule):
        self.schedule = schedule
        self.frames: deque[np.ndarray] = deque()
        self.base = 0          # absolute index of frames[0]
        self.block = 0         # next block to hand out
        self.ended = False

    @property
    def end(self) -> int:
        return self.base + len(self.frames)

    def push(self, frame: np.ndarray) -> None:
        if self.ended:
            raise RuntimeError("LQBuffer: push after end")
        self.frames.append(frame)

    def finish(self) -> None:
        """The source ended: pad with copies of the last frame, as upstream pads a finite video."""
        if not self.ended and self.frames:
            for _ in range(self.schedule.tail_pad):
                self.frames.append(self.frames[-1])
        self.ended = True

    def needs(self) -> int:
        """Frames still missing for the next block."""
        return max(0, self.schedule.lq_range(self.block)[1] - self.end)

    def ready(self) -> bool:
        return self.needs() == 0

    def _take(self, a: int, b: int) -> np.ndarray:
        return np.stack([self.frames[i - self.base] for i in range(a, b)])

    def pop(self) -> tuple[np.ndarray, np.ndarray]:
        """(DiT frames, decoder frames) of the next block, uint8 [T, H, W, 3]; drops what no block needs."""
        if not self.ready():
            raise RuntimeError(f"LQBuffer: block {self.block} needs {self.needs()} more frames")
        lq = self._take(*self.schedule.lq_range(self.block))
        cond = self._take(*self.schedule.cond_range(self.block))
        self.block += 1
        keep_from = self.schedule.cond_range(self.block)[0]
        while self.base < keep_from and self.frames:
            self.frames.popleft()
            self.base += 1
        return lq, cond
