"""Reading a video file frame by frame with PyAV, without holding more than one decoded frame.

``probe`` opens the container once for what the run needs up front (size, frame rate, frame
count, audio): cheap checks that refuse a bad file before any weight is read. The frame
count is the container's when it records one, else the video packets counted by demuxing
(no decoding). ``frames`` then decodes lazily, one RGB frame at a time.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from engine.errors import FdError
from nodes.common.media import MediaSource


def _open(path: str):
    import av
    p = Path(path).expanduser()
    if not p.is_file():
        raise FdError(f"video {path}: no such file")
    try:
        container = av.open(str(p))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise FdError(f"video {path}: cannot be read ({e}); is it a video file (mp4, mkv, mov, webm ...)?") from None
    if not container.streams.video:
        container.close()
        raise FdError(f"video {path}: the file has no video stream")
    return container


def probe(path: str) -> MediaSource:
    """Size, frame rate, frame count and audio of ``path``; an FdError for anything unreadable or empty."""
    import av
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = stream.average_rate or stream.guessed_rate or stream.base_rate or Fraction(30)
        n = int(stream.frames or 0)
        if n <= 0:
            try:
                n = sum(1 for packet in container.demux(stream) if packet.size)
            except av.error.FFmpegError as e:
                raise FdError(f"video {path}: cannot be read ({e})") from None
        w, h = stream.codec_context.width, stream.codec_context.height
        audio = bool(container.streams.audio)
    finally:
        container.close()
    if n <= 0:
        raise FdError(f"video {path}: the file holds no video frames")
    if not w or not h:
        raise FdError(f"video {path}: the video stream has no frame size")
    return MediaSource(str(path), Fraction(fps), int(w), int(h), n, audio)


def frames(path: str) -> Iterator[np.ndarray]:
    """Decoded RGB frames [h, w, 3] uint8, in order, one at a time (the container closes at the end)."""
    import av
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as e:
            raise FdError(f"video {path}: decoding failed ({e})") from None
    finally:
        container.close()
