"""PNG frames sink: one file per frame in a folder that appears whole at session end."""
from __future__ import annotations

from dataclasses import dataclass

from engine.node import Node, Param, Port
from engine.types import PIXELS

from engine.files import AtomicPath
from engine.frames import to_uint8_frames


@dataclass
class _PngState:
    target: AtomicPath | None = None
    frames: int = 0


class PngSink(Node):
    type_name = "sink.png"
    doc = "Writes every frame as PNG into a folder (frame_000000.png, ...); atomic on close."
    inputs = (Port("frames", PIXELS, "frames [B, T, 3, H, W] in [-1, 1]; sample 0 is written"),)
    params = (Param("path", str, "out/frames", "output folder"),)
    is_sink = True

    def new_state(self):
        return _PngState()

    def run(self, inputs, state: _PngState, step):
        import av

        if state.target is None:
            state.target = AtomicPath(self.p.path, directory=True)
        for f in to_uint8_frames(inputs["frames"]):
            codec = av.CodecContext.create("png", "w")  # PyAV's own PNG encoder: no imaging library needed
            codec.width, codec.height, codec.pix_fmt = f.shape[1], f.shape[0], "rgb24"
            packets = codec.encode(av.VideoFrame.from_ndarray(f, format="rgb24")) + codec.encode(None)
            (state.target.tmp / f"frame_{state.frames:06d}.png").write_bytes(b"".join(bytes(p) for p in packets))
            state.frames += 1
        return {}

    def close(self, state: _PngState):
        if state.target is not None:
            state.target.commit()

    def abort(self, state: _PngState):
        if state.target is not None:
            state.target.discard()
