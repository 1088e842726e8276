"""MP4 sink (PyAV, H.264): appends each block's frames as they arrive; the file appears whole at session end."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.node import Node, Param, Port
from engine.types import PIXELS

from engine.files import AtomicPath
from engine.frames import to_uint8_frames


@dataclass
class _Mp4State:
    target: AtomicPath | None = None
    container: object = None
    stream: object = None
    frames: int = 0


class Mp4Sink(Node):
    type_name = "sink.mp4"
    doc = "Writes video frames to an MP4 file (H.264, yuv420p), block by block; atomic on close."
    inputs = (Port("frames", PIXELS, "frames [B, T, 3, H, W] in [-1, 1]; sample 0 is written"),)
    params = (
        Param("path", str, "out/video.mp4", "output file"),
        Param("fps", int, 16, "frames per second", min=1, max=240),
        Param("crf", int, 18, "x264 quality (lower is better)", min=0, max=51),
    )
    is_sink = True
    is_video = True

    def new_state(self):
        return _Mp4State()

    def run(self, inputs, state: _Mp4State, step):
        import av

        frames = to_uint8_frames(inputs["frames"])
        if state.container is None:
            h, w = frames.shape[1:3]
            state.target = AtomicPath(self.p.path)
            state.container = av.open(str(state.target.tmp), "w", format="mp4")
            state.stream = state.container.add_stream("libx264", rate=self.p.fps)
            state.stream.width, state.stream.height = w + (w % 2), h + (h % 2)
            state.stream.pix_fmt = "yuv420p"
            state.stream.options = {"crf": str(self.p.crf)}
        h, w = state.stream.height, state.stream.width
        for f in frames:
            if f.shape[0] != h or f.shape[1] != w:  # odd sizes: pad by edge replication for yuv420p
                f = np.pad(f, ((0, h - f.shape[0]), (0, w - f.shape[1]), (0, 0)), mode="edge")
            for packet in state.stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                state.container.mux(packet)
            state.frames += 1
        return {}

    def close(self, state: _Mp4State):
        if state.container is None:
            return
        for packet in state.stream.encode():
            state.container.mux(packet)
        state.container.close()
        state.target.commit()
        state.container = None

    def abort(self, state: _Mp4State):
        if state.container is not None:
            try:
                state.container.close()
            finally:
                state.target.discard()
                state.container = None
