"""`omnidreams.hdmap_video`: the rasterised HD-map frames of each block, from video files (PyAV) or pushed.

OmniDreams conditions every chunk on the HD-map frames of the same time span, encoded like the video
(LightVAE for the released single-view model). A chunk of f latent frames spans 1 + 4(f - 1) pixel frames at
block 0 and 4f after it (the Wan VAE's causal time stride), so this node hands out exactly that many frames
per block, in order, and a file that runs out or has another size is a clear error (no silent resize: the
HD-map must be rasterised at the video's resolution).

Two sources:
- ``path``: one video file per view (a list for multi-view, in the DiT's view order = the batch), decoded
  frame by frame with PyAV, so a long drive is never held in memory;
- the ``frames`` input: whatever the caller pushes before each block (``session.set_input`` with an
  [V, T, 3, H, W] float tensor in [-1, 1], or uint8 [V, T, H, W, 3]); a live simulator or renderer feeds
  the model this way. When wired it wins over ``path``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.errors import FdError
from engine.node import Node, Param, Port
from engine.types import LATENT, PIXELS, TENSOR


@dataclass
class _Readers:
    """The open video files of a session and how many frames were read from each."""
    containers: list = field(default_factory=list)
    iters: list = field(default_factory=list)
    read: int = 0


class HDMapVideoNode(Node):
    type_name = "omnidreams.hdmap_video"
    doc = ("HD-map frames per block (1 + 4(f - 1) at block 0, 4f after) from video files via PyAV, one per view, "
           "or pushed per block through the `frames` input; size and count are checked.")
    inputs = (Port("frames", TENSOR, "frames pushed for this block: [V, T, 3, H, W] in [-1, 1] or uint8 "
                   "[V, T, H, W, 3]; when wired, `path` is not read", optional=True),)
    outputs = (Port("frames", PIXELS, "this block's HD-map frames [V, T, 3, H, W] in [-1, 1]"),)
    params = (
        Param("path", list, [], "video file(s), one per view in the DiT's view order (a single-view spec: one)"),
        Param("latent_frames", int, 2, "latent frames per block (the sampler's frames_per_block)", min=1),
        Param("temporal_factor", int, 4, "pixel frames per latent frame after the first (Wan VAE: 4)", min=1),
        Param("height", int, 704, "frame height in pixels (the video's)", min=8),
        Param("width", int, 1280, "frame width in pixels (the video's)", min=8),
    )

    def new_state(self) -> _Readers:
        return _Readers()

    def state_tensors(self, state: _Readers) -> dict:
        return {"read": state.read}

    def load_state(self, state: _Readers, values: dict) -> _Readers:
        state.read = int(values.get("read", 0))   # the files are reopened and skipped to here
        return state

    def frames_for(self, block: int) -> int:
        f, t = self.p.latent_frames, self.p.temporal_factor
        return 1 + t * (f - 1) if block == 0 else t * f

    def run(self, inputs, state: _Readers, step):
        b = step.block or 0
        want = self.frames_for(b)
        if inputs.get("frames") is not None:
            frames = self._pushed(inputs["frames"], b, want)
        else:
            frames = self._read(state, b, want)
        return {"frames": frames.to(self.device)}

    def _check(self, frames: torch.Tensor, b: int, want: int, where: str) -> torch.Tensor:
        H, W = self.p.height, self.p.width
        if frames.ndim != 5 or frames.shape[1] != want or tuple(frames.shape[2:]) != (3, H, W):
            raise FdError(f"node {self.name!r}: {where}: block {b} got HD-map frames {list(frames.shape)}; it needs "
                          f"[views, {want}, 3, {H}, {W}] ({want} frames: "
                          f"{'1 + ' if b == 0 else ''}{self.p.temporal_factor} x "
                          f"{self.p.latent_frames - (b == 0)} for {self.p.latent_frames} latent frames; the size "
                          "of the params height/width)")
        return frames

    def _pushed(self, x, b: int, want: int) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.dtype == torch.uint8:
            if x.ndim != 5 or x.shape[-1] != 3:
                raise FdError(f"node {self.name!r}: pushed uint8 HD-map frames {list(x.shape)}: expected "
                              "[views, T, H, W, 3]")
            x = x.permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0
        return self._check(x.float(), b, want, "the pushed `frames` input")

    def _open(self, state: _Readers) -> None:
        import av
        paths = [str(p) for p in (self.p.path if isinstance(self.p.path, list) else [self.p.path])]
        if not paths:
            raise FdError(f"node {self.name!r}: no HD-map source: set params.path to the video file(s) or wire "
                          "the `frames` input")
        from nodes.checkpoint import CheckpointError, resolve
        for p in paths:
            try:
                c = av.open(str(resolve(p, kind="file")))
            except (OSError, CheckpointError, av.error.FFmpegError) as e:      # missing or not a video
                raise FdError(f"node {self.name!r}: cannot open HD-map video {p}: {e}") from e
            state.containers.append(c)
            state.iters.append(c.decode(video=0))
        skip = state.read
        state.read = 0
        for _ in range(skip):                                  # a restored session resumes where it was
            self._next(state, 0)

    def _next(self, state: _Readers, b: int) -> torch.Tensor:
        views = []
        for p, it in zip(self.p.path if isinstance(self.p.path, list) else [self.p.path], state.iters):
            try:
                fr = next(it)
            except StopIteration:
                raise FdError(f"node {self.name!r}: HD-map video {p} ended after {state.read} frames; block {b} "
                              f"needs frames {state.read} .. {state.read + self.frames_for(b) - 1} (a longer "
                              "video, or fewer blocks)") from None
            views.append(torch.from_numpy(fr.to_ndarray(format="rgb24")))
        state.read += 1
        return torch.stack(views)                              # [V, H, W, 3] uint8

    def _read(self, state: _Readers, b: int, want: int) -> torch.Tensor:
        if not state.iters:
            self._open(state)
        frames = torch.stack([self._next(state, b) for _ in range(want)], dim=1)     # [V, T, H, W, 3]
        x = frames.permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0
        return self._check(x, b, want, f"video {self.p.path}")

    def close(self, state: _Readers) -> None:
        for c in state.containers:
            c.close()
        state.containers.clear()
        state.iters.clear()

    abort = close

    def release(self, state: _Readers) -> None:
        self.close(state)


class HDMapPixelShuffleNode(Node):
    """The 192-channel HD-map branch's encoder (FlashDreams ``PixelShuffleVAEEncoder``, a stateless pseudo-VAE):
    one pixel frame per latent frame (``last_frame``: block 0 keeps frame 0 and then every 4th from frame 4,
    later blocks frames 3, 7, ...; ``first_frame``: 0, 1, 5, ... and 0, 4, ...), each unshuffled 8x8 into
    channels in (c, h8, w8) order: [V, T, 3, H, W] -> [V, f, 192, H/8, W/8]."""
    type_name = "omnidreams.hdmap_pixel_shuffle"
    doc = "HD-map frames -> the 192-channel pixel-shuffle HD-map latent (frame selection + 8x8 unshuffle)."
    inputs = (Port("frames", PIXELS, "this block's HD-map frames [V, T, 3, H, W] in [-1, 1]"),)
    outputs = (Port("latent", LATENT, "[V, f, 3 * 64, H/8, W/8]"),)
    params = (
        Param("latent_frames", int, 4, "latent frames per block (the sampler's frames_per_block)", min=1),
        Param("frame_selection", str, "last_frame", "which pixel frame of each 4-frame window is kept",
              choices=("last_frame", "first_frame")),
    )

    def run(self, inputs, state, step):
        x = inputs["frames"]
        b, f = step.block or 0, self.p.latent_frames
        want = 1 + 4 * (f - 1) if b == 0 else 4 * f
        if x.ndim != 5 or x.shape[1] != want or x.shape[2] != 3 or x.shape[3] % 8 or x.shape[4] % 8:
            raise FdError(f"node {self.name!r}: block {b} got HD-map frames {list(x.shape)}; it needs "
                          f"[views, {want}, 3, H, W] with H and W multiples of 8 ({f} latent frames per block)")
        last = self.p.frame_selection == "last_frame"
        if b == 0:
            idx = [0] + list(range(4 if last else 1, want, 4))
        else:
            idx = list(range(3 if last else 0, want, 4))
        sel = x[:, idx]                                                  # [V, f, 3, H, W]
        V, T, C, H, W = sel.shape
        z = sel.reshape(V, T, C, H // 8, 8, W // 8, 8).permute(0, 1, 2, 4, 6, 3, 5)
        return {"latent": z.reshape(V, T, C * 64, H // 8, W // 8).contiguous()}


NODE_TYPES = (HDMapVideoNode, HDMapPixelShuffleNode)
