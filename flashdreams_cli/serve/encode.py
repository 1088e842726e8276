"""Frames to JPEG (and back) with PyAV's mjpeg codec.

Why one JPEG per frame rather than fragmented MP4 over MSE:
- latency: a JPEG is ready the moment its frame is; an fMP4 fragment waits for a
  group of frames, and the browser's MSE buffer adds its own playout delay;
- drops: every JPEG stands alone, so a slow client can skip frames (latest wins)
  without waiting for the next keyframe or corrupting a decoder;
- browser decode: ``createImageBitmap(new Blob([bytes]))`` onto a <canvas> in
  every browser, no MSE codec strings, no demuxer in JavaScript.
The cost is bandwidth (no inter-frame prediction), which loopback and LAN demos
can afford. No PIL: PyAV is already a dependency for the MP4 sink.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np


def quality_to_qscale(quality: int) -> int:
    """JPEG quality 1..100 (higher is better) to FFmpeg's qscale 31..2 (lower is better)."""
    q = min(max(int(quality), 1), 100)
    return int(round(2 + (100 - q) * 29 / 99))


class JpegEncoder:
    """Encodes [H, W, 3] uint8 RGB frames; reopens its codec when the frame size changes."""

    def __init__(self, quality: int = 85):
        self.qscale = quality_to_qscale(quality)
        self._ctx = None
        self._size: tuple[int, int] | None = None
        self._pts = 0

    def _open(self, width: int, height: int) -> None:
        import av

        ctx = av.CodecContext.create("mjpeg", "w")
        ctx.width, ctx.height = width, height
        ctx.pix_fmt = "yuvj420p"
        ctx.time_base = Fraction(1, 30)
        ctx.options = {"qmin": str(self.qscale), "qmax": str(self.qscale)}
        ctx.open()
        self._ctx, self._size = ctx, (width, height)

    def encode(self, rgb: np.ndarray) -> bytes:
        import av

        h, w = rgb.shape[:2]
        pad_h, pad_w = h % 2, w % 2   # 4:2:0 chroma wants even sides: replicate the last row/column
        if pad_h or pad_w:
            rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        if self._size != (rgb.shape[1], rgb.shape[0]):
            self._open(rgb.shape[1], rgb.shape[0])
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuvj420p")
        frame.pts = self._pts
        self._pts += 1
        packets = self._ctx.encode(frame)
        return b"".join(bytes(p) for p in packets)


class JpegDecoder:
    """JPEG bytes to [H, W, 3] uint8 RGB (the Python client's side)."""

    def __init__(self):
        import av

        self._ctx = av.CodecContext.create("mjpeg", "r")

    def decode(self, jpeg: bytes) -> np.ndarray:
        import av

        frames = self._ctx.decode(av.Packet(jpeg))
        if not frames:
            raise ValueError("the JPEG did not decode to a frame")
        return frames[0].to_ndarray(format="rgb24")
