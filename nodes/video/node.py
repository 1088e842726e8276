"""`video.input`: the LQ frames of a video-to-video model (FlashVSR), block by block.

Two sources, one node:

- a file (``path``, e.g. ``${inputs.video}``): decoded lazily with PyAV, one frame at a time;
  the number of blocks is the file's (``blocks_available``), so ``fd exec`` stops at the
  video's end without a ``num_blocks``. One chunk per block, upstream's 4-frame tail padding.
- an upstream node's frames (port ``frames``, e.g. a world model's decoder, or a live feed a
  server pushes in): buffered, and every whole chunk is handed out as soon as it is
  complete, so a block carries 0, 1 or more chunks (their frames back to back). A live
  stream has no end, so nothing is padded.

Every frame is upscaled bicubically and centre-cropped exactly as upstream
(``nodes.video.prep``); ``lq`` is what the DiT's LQ projector eats this block, ``cond`` what
the decoder is conditioned on and colour-corrected against (``nodes.video.chunks``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterator

import numpy as np
import torch

from engine.errors import FdError
from engine.frames import to_uint8_frames
from engine.node import BLOCK, Node, Param, Port
from engine.types import PIXELS
from nodes.common.media import MEDIA, MediaSource

from .chunks import ChunkSchedule, LQBuffer
from .prep import SCALES, Geometry, PrepError, geometry, to_signed, upscale_crop


@dataclass
class _VideoState:
    buffer: LQBuffer
    frames: Iterator[np.ndarray] | None = None      # the file's decoder (file source)
    geometry: Geometry | None = None
    read: int = 0                                   # source frames taken so far
    extra: dict[str, Any] = field(default_factory=dict)


class VideoInputNode(Node):
    type_name = "video.input"
    doc = ("Video frames for a video-to-video model (FlashVSR): read from a file with PyAV chunk by chunk, or "
           "taken from an upstream node; bicubic x scale and centre crop to multiples of 128 px as upstream.")
    inputs = (Port("frames", PIXELS, "frames [B, T, 3, h, w] in [-1, 1] from another node (a world model, a "
                   "live feed) instead of a file; sample 0 is used", optional=True),)
    outputs = (
        Port("lq", PIXELS, "the LQ frames the DiT consumes this block [1, T, 3, H, W] in [-1, 1] (file: 25 at "
             "block 0, then 8; frames port: whole chunks as they complete, possibly none)"),
        Port("cond", PIXELS, "the LQ frames of this block's output, for the decoder and colour fix (file: 21 "
             "at block 0, then 8)"),
        Port("source", MEDIA, "the source file, frame rate and audio, for a sink that keeps them"),
    )
    params = (
        Param("path", str, None, "video file (mp4, mkv, mov, webm ...); null when the frames port is wired",
              nullable=True),
        Param("scale", float, 4.0, "upscale factor (FlashVSR: 4, or 2)", choices=SCALES),
        Param("multiple", int, 128, "crop the upscaled frames to multiples of this many pixels (the DiT's "
              "8x8-token windows: 128)", min=8),
        Param("fps", float, 16.0, "frame rate reported for frames from the frames port (a file has its own)",
              min=1, max=240),
    )
    phase = BLOCK

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule = ChunkSchedule()
        self._source: MediaSource | None = None

    # ------------------------------------------------------------------ checks before any weight loads
    def _file_mode(self) -> bool:
        return self.p.path is not None

    def _where(self) -> str:
        return f"node {self.name!r} ({self.type_name})"

    def _check_scale(self) -> None:
        if float(self.p.scale) not in SCALES:   # validation catches it in a spec; this covers direct use
            raise FdError(f"{self._where()}: scale must be one of {list(SCALES)}, got {self.p.scale}")

    def preflight(self, upstream: dict[str, Node]) -> None:
        self._check_scale()
        if self._file_mode() and "frames" in upstream:
            raise FdError(f"{self._where()}: both `path` ({self.p.path}) and the `frames` port are given; "
                          "use one (set params.path: null to take the wired frames)")
        if not self._file_mode() and "frames" not in upstream:
            raise FdError(f"{self._where()}: no source: set params.path (e.g. inputs.video=in.mp4) or wire the "
                          "`frames` port")
        if self._file_mode():
            self.source()

    def source(self) -> MediaSource:
        """The file's description, read once and checked: readable, non-empty, long and large enough."""
        if self._source is None:
            from .reader import probe
            src = probe(str(self.p.path))
            self._geometry(src.width, src.height, f"video {src.path}")
            if src.frames < self.schedule.min_frames:
                raise FdError(f"video {src.path}: {src.frames} frames; FlashVSR's first chunk needs at least "
                              f"{self.schedule.min_frames} (use a longer clip)")
            self._source = src
        return self._source

    def _geometry(self, w: int, h: int, what: str | None) -> Geometry:
        try:
            return geometry(w, h, float(self.p.scale), self.p.multiple)
        except PrepError as e:
            raise FdError(f"{what or self._where()}: {e}") from None

    def blocks_available(self) -> int | None:
        """A file gives a fixed number of chunks; the runner stops there. A frames port does not limit the run."""
        return self.schedule.blocks_for(self.source().frames) if self._file_mode() else None

    # ------------------------------------------------------------------ session
    def new_state(self) -> _VideoState:
        state = _VideoState(LQBuffer(self.schedule))
        if self._file_mode():
            from .reader import frames
            src = self.source()
            state.frames = frames(src.path)
            state.geometry = self._geometry(src.width, src.height, f"video {src.path}")
        return state

    def release(self, state) -> None:
        if state is not None and state.frames is not None:
            state.frames.close()      # closes the container
            state.frames = None

    def state_tensors(self, state: _VideoState) -> dict:
        """A file session resumes by re-reading the file up to where it was (``blocks``)."""
        return {"blocks": state.buffer.block, "read": state.read}

    def load_state(self, state: _VideoState, values: dict):
        if not values:
            return state
        if not self._file_mode():
            raise ValueError("video.input: a session fed through the frames port cannot be restored (its "
                             "frames came from upstream)")
        for _ in range(int(values["blocks"])):
            self._fill_from_file(state)
            state.buffer.pop()
        return state

    # ------------------------------------------------------------------ run
    def _prep(self, state: _VideoState, frame: np.ndarray) -> np.ndarray:
        try:
            return upscale_crop(frame, state.geometry)
        except PrepError as e:
            raise FdError(f"{self.p.path or self._where()}: frame {state.read}: {e}") from None

    def _fill_from_file(self, state: _VideoState) -> None:
        buf = state.buffer
        while not buf.ready() and not buf.ended:
            frame = next(state.frames, None)
            if frame is None:
                buf.finish()
                break
            buf.push(self._prep(state, frame))
            state.read += 1
        if not buf.ready():
            raise FdError(f"video {self.p.path}: ended after {state.read} frames, but block {buf.block} needs "
                          f"frames up to {self.schedule.lq_range(buf.block)[1] - self.schedule.tail_pad} (the "
                          f"video has {self.schedule.blocks_for(state.read)} blocks; run fewer)")

    def _fill_from_port(self, state: _VideoState, pixels: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
        frames = to_uint8_frames(pixels) if pixels.shape[1] else np.zeros((0,), np.uint8)
        for frame in frames:
            if state.geometry is None:
                state.geometry = self._geometry(frame.shape[1], frame.shape[0], None)
            state.buffer.push(self._prep(state, frame))
            state.read += 1
        out = []
        while state.buffer.ready():
            out.append(state.buffer.pop())
        return out

    def _media(self, state: _VideoState) -> MediaSource:
        if self._file_mode():
            return self.source()
        g = state.geometry
        return MediaSource(None, Fraction(self.p.fps).limit_denominator(1001), g.src_w if g else 0,
                           g.src_h if g else 0, None, False)

    def run(self, inputs, state: _VideoState, step):
        if self._file_mode():
            self._fill_from_file(state)
            chunks = [state.buffer.pop()]
        else:
            chunks = self._fill_from_port(state, inputs["frames"])
        g = state.geometry
        empty = np.zeros((0, g.out_h if g else 0, g.out_w if g else 0, 3), np.uint8)
        lq = np.concatenate([c[0] for c in chunks]) if chunks else empty
        cond = np.concatenate([c[1] for c in chunks]) if chunks else empty
        return {"lq": to_signed(lq), "cond": to_signed(cond), "source": self._media(state)}


NODE_TYPES = (VideoInputNode,)
