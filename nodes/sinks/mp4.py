"""MP4 sink (PyAV, H.264): appends each block's frames as they arrive; the file appears whole at session end.

With a ``source`` wired (``video.input``'s), the video keeps the source's frame rate and, with
``audio: true``, the source's first audio stream is copied in (remuxed packet by packet, not
re-encoded). Audio is muxed as the video grows, up to the video's current end, and cut where
the video ends (an upscaler may drop the last few input frames), so the two stay in sync.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Iterator

import numpy as np

from engine.errors import FdError
from engine.files import AtomicPath
from engine.frames import to_uint8_frames
from engine.node import Node, Param, Port
from engine.types import PIXELS
from nodes.common.media import MEDIA


@dataclass
class _Mp4State:
    target: AtomicPath | None = None
    container: object = None
    stream: object = None
    frames: int = 0
    fps: Fraction | None = None
    audio_in: object = None          # the source container the audio packets come from
    audio_packets: Iterator | None = None
    audio_out: object = None
    pending: Any = None              # the next audio packet, not yet muxed (it starts after the video's end)


class Mp4Sink(Node):
    type_name = "sink.mp4"
    doc = ("Writes video frames to an MP4 file (H.264, yuv420p), block by block; atomic on close. With a source "
           "wired, keeps its frame rate and audio track.")
    inputs = (
        Port("frames", PIXELS, "frames [B, T, 3, H, W] in [-1, 1]; sample 0 is written (T may be 0)"),
        Port("source", MEDIA, "the video the frames were made from (video.input's source): its frame rate is "
             "kept and its audio copied", optional=True),
    )
    params = (
        Param("path", str, "out/video.mp4", "output file"),
        Param("fps", int, 16, "frames per second (a wired source's frame rate wins: the audio must stay in sync)",
              min=1, max=240),
        Param("crf", int, 18, "x264 quality (lower is better)", min=0, max=51),
        Param("audio", bool, True, "copy the wired source's audio stream into the output"),
    )
    is_sink = True
    is_video = True

    def new_state(self):
        return _Mp4State()

    def _open(self, state: _Mp4State, frames: np.ndarray, source) -> None:
        import av
        h, w = frames.shape[1:3]
        state.fps = Fraction(source.fps) if source is not None and source.fps else Fraction(self.p.fps)
        state.target = AtomicPath(self.p.path)
        state.container = av.open(str(state.target.tmp), "w", format="mp4")
        state.stream = state.container.add_stream("libx264", rate=state.fps)
        state.stream.width, state.stream.height = w + (w % 2), h + (h % 2)
        state.stream.pix_fmt = "yuv420p"
        state.stream.options = {"crf": str(self.p.crf)}
        if self.p.audio and source is not None and source.audio and source.path:
            self._open_audio(state, source.path)

    def _open_audio(self, state: _Mp4State, path: str) -> None:
        import av
        try:
            state.audio_in = av.open(str(path))
            audio = state.audio_in.streams.audio[0]
            state.audio_out = state.container.add_stream_from_template(audio)
        except (av.error.FFmpegError, OSError, IndexError, ValueError) as e:
            raise FdError(f"sink {self.name!r}: cannot copy the audio of {path}: {e} (set params.audio: false "
                          "to write the video without it)") from None
        state.audio_packets = (p for p in state.audio_in.demux(audio) if p.dts is not None)

    def _mux_audio(self, state: _Mp4State, until: float) -> None:
        """Copy audio packets that start before ``until`` seconds (the video's current end)."""
        if state.audio_packets is None:
            return
        while True:
            packet = state.pending if state.pending is not None else next(state.audio_packets, None)
            state.pending = None
            if packet is None:
                state.audio_packets = None
                return
            start = float(packet.pts * packet.time_base) if packet.pts is not None else 0.0
            if start >= until:
                state.pending = packet
                return
            packet.stream = state.audio_out
            state.container.mux(packet)

    def run(self, inputs, state: _Mp4State, step):
        import av

        frames = to_uint8_frames(inputs["frames"])
        if state.container is None:
            if not len(frames):
                return {}      # nothing yet (a chained upscaler filling its first chunk): size still unknown
            self._open(state, frames, inputs.get("source"))
        h, w = state.stream.height, state.stream.width
        for f in frames:
            if f.shape[0] != h or f.shape[1] != w:  # odd sizes: pad by edge replication for yuv420p
                f = np.pad(f, ((0, h - f.shape[0]), (0, w - f.shape[1]), (0, 0)), mode="edge")
            for packet in state.stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                state.container.mux(packet)
            state.frames += 1
        self._mux_audio(state, float(state.frames / state.fps))
        return {}

    def _close_audio(self, state: _Mp4State) -> None:
        if state.audio_in is not None:
            state.audio_in.close()
            state.audio_in = state.audio_packets = state.pending = None

    def close(self, state: _Mp4State):
        if state.container is None:
            return
        for packet in state.stream.encode():
            state.container.mux(packet)
        self._mux_audio(state, float(state.frames / state.fps))
        self._close_audio(state)
        state.container.close()
        state.target.commit()
        state.container = None

    def abort(self, state: _Mp4State):
        self._close_audio(state)
        if state.container is not None:
            try:
                state.container.close()
            finally:
                state.target.discard()
                state.container = None
