"""Streaming Wan VAE: decode / encode a clip chunk by chunk with explicit conv caches.

The state of a stream is ``cache`` (a list with one [B,C,n,H,W] tensor per temporal
conv, created at the first chunk, then updated in place: fixed shapes and addresses,
so later chunks of a fixed size can be CUDA-graph captured) and ``first`` (whether the
next chunk starts the clip). Concatenating the chunk outputs equals the whole-clip
``WanVAE.decode`` / ``encode`` for any chunking (up to conv rounding).

Decoder modes:
- default: upstream ``WanVAE_.decode`` / ``cached_decode`` semantics (latent frame 0
  -> 1 pixel frame, every later latent frame -> 4).
- ``zero_init=True``: Self-Forcing's demo ``VAEDecoderWrapper`` (demo_utils/vae_block3.py):
  the cache starts as zeros instead of None, so the temporal upsamplers never take
  the first-frame 'Rep' path: latent frame 0 already yields 4 frames (the demo drops
  the first 3) and frame 1 sees frame 0. Not equal to the full decode; ``demo()``
  also clamps and uses its [B,T,C,H,W] layout.

``fused=True`` (default) runs the decoder's fused path (``vae_blocks.FusedOps``): norm+SiLU
written straight into each conv's [history | new] window, nearest-x2 upsample + 3x3 conv as
one sub-pixel 2x2 conv on the low-res input, and channels-last kept through the temporal
upsample. ``compile=True`` also torch.compiles that pointwise glue (CUDA) and, unless ``fast_convs=False``, runs the
RGB head as a GEMM + tap sum (``vae_blocks.FusedOps.tap_head``). ``fused=False`` is
the plain reference formulation (cat, interpolate, conv, bias) the fused path is checked
against.

``graphs=True`` (CUDA) replays the decode of every later chunk as a CUDA graph
(engine.capture): after the first chunk the conv caches exist and keep their
addresses, so a chunk of a given size is one static graph.

The streams drive any module with ``encode_step`` / ``decode_step`` / ``temporal_factor``
(``nodes.wan.vae.WanVAE``) and import none: ``vae.py`` uses the streams for its whole-clip
``encode`` / ``decode``, so an import back would be a circle.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.capture import GraphCache
from nodes.common.conv import AUTOTUNE_PLAN_LIMIT, cudnn_autotune

from .vae_blocks import ConvCache, FusedOps

# cuDNN tries every conv plan for chunks of up to this many latent frames (a streamed block, or a whole clip
# decoded a few frames per call: each shape tuned once, then run every block; the 96-channel conv's fastest plan
# is past the first ten). A longer chunk (a one-shot decode of a whole clip) keeps the caller's limit (torch's
# default: ten): with every plan, W2's 21-frame one-shot decode had not finished its first call within 300 s on an
# H100 (2026-12-06), against 136 s with ten.
ALL_PLANS_MAX_LATENT_FRAMES = 5


def _to_bcthw(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.permute(0, 2, 1, 3, 4) if layout == "btchw" else x


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d)


class _CacheState:
    """A stream's session-snapshot state: its conv caches and first-chunk flag (memory formats recorded: a
    channels-last cache restored contiguous would change the conv arithmetic). Shared by both streams."""
    vae: nn.Module
    cache: list[torch.Tensor]
    first: bool

    def state_tensors(self) -> dict:
        out: dict = {"first": self.first, "channels_last": [_is_channels_last(t) for t in self.cache]}
        out.update({f"cache.{i}": t for i, t in enumerate(self.cache)})
        return out

    def load_state(self, values: dict) -> None:
        """The values of ``state_tensors`` (a snapshot without ``channels_last``, from before it was recorded,
        restores each cache in the format it comes in)."""
        device = next(self.vae.parameters()).device
        n = len([k for k in values if k.startswith("cache.")])
        caches = []
        for i, cl in enumerate(values.get("channels_last") or [None] * n):
            t = values[f"cache.{i}"].to(device, copy=True)
            fmt = torch.channels_last_3d if cl else torch.contiguous_format
            caches.append(t if cl is None else t.contiguous(memory_format=fmt))
        self.cache[:] = caches
        self.first = bool(values["first"])


class StreamingDecoder(_CacheState):
    """Decode latent chunks of any size; outputs concatenate to the whole-clip decode."""

    def __init__(self, vae: nn.Module, zero_init: bool = False, clamp: bool = False,
                 layout: str = "bcthw", cache: list[torch.Tensor] | None = None, graphs: bool = False,
                 fused: bool = True, compile: bool = False, autotune: bool = True,
                 fused_ops: FusedOps | None = None, fast_convs: bool | None = None):
        if layout not in ("bcthw", "btchw"):
            raise ValueError(f"layout must be 'bcthw' or 'btchw', got {layout!r}")
        self.vae = vae
        self.zero_init = zero_init
        self.clamp = clamp
        self.layout = layout
        self.cache: list[torch.Tensor] = [] if cache is None else cache
        self.first = not zero_init
        # fused_ops: share one FusedOps (its compiled kernels) between the streams of one model, so a new
        # session does not trace and compile the glue again (each fresh torch.compile wrapper would)
        self.fused = fused_ops if fused_ops is not None else FusedOps.make(compile, fast_convs) if fused or compile \
            else None
        self.autotune = autotune
        device = next(vae.parameters()).device
        self.graphs = GraphCache(self._later_chunk, device, enabled=graphs, name="vae")

    def _later_chunk(self, z: torch.Tensor) -> torch.Tensor:
        out = self.vae.decode_step(z, ConvCache(self.cache, first=False, fused=self.fused))
        return out.float().clamp_(-1, 1) if self.clamp else out

    def graph_status(self) -> str:
        return self.graphs.status()

    @classmethod
    def demo(cls, vae: nn.Module) -> "StreamingDecoder":
        """Self-Forcing demo decoder: zero cache, clamped, [B,T,C,H,W] in and out."""
        return cls(vae, zero_init=True, clamp=True, layout="btchw")

    def reset(self) -> None:
        """Start a new clip, keeping the cache storage (zeroed) for reuse."""
        for t in self.cache:
            t.zero_()
        self.first = not self.zero_init


    @torch.no_grad()
    def decode_chunk(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent [B,z,f,h,w] (or [B,f,z,h,w]) -> pixels, same layout.

        f latent frames give 4f pixel frames, except 1+4(f-1) for the clip's first chunk
        in the default mode.
        """
        z = _to_bcthw(latent, self.layout)
        plans = AUTOTUNE_PLAN_LIMIT if z.shape[2] <= ALL_PLANS_MAX_LATENT_FRAMES else None
        with cudnn_autotune(self.autotune, plans):
            out = self._decode(z)
        self.first = False
        return _to_bcthw(out, self.layout)

    def chunk_sizes(self, frames: int, size: int) -> list[int]:
        """How ``decode_in_chunks`` splits ``frames`` latent frames, ``size`` (0: all) at a time.

        The clip's first latent frame goes alone: it decodes to one pixel frame through shapes of its own, so
        every later call of a clip of 1 + k*size latents has one shape: one cuDNN autotune, one CUDA graph.
        """
        if not size or (size >= frames and not self.first):
            return [frames]
        head = [1] if self.first else []
        rest = frames - len(head)
        return head + [size] * (rest // size) + ([rest % size] if rest % size else [])

    def decode_in_chunks(self, latent: torch.Tensor, size: int) -> torch.Tensor:
        """``decode_chunk`` over the ``chunk_sizes`` pieces of a latent; the same frames as one call."""
        axis = 1 if self.layout == "btchw" else 2
        parts = [self.decode_chunk(piece) for piece in latent.split(self.chunk_sizes(latent.shape[axis], size), axis)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.first or not self.cache:  # the caches are created by this call: never captured
            out = self.vae.decode_step(z, ConvCache(self.cache, first=self.first, fused=self.fused))
            if self.clamp:
                out = out.float().clamp_(-1, 1)
        else:
            key = (tuple(z.shape), z.dtype, z.stride(), len(self.cache), self.cache[0].data_ptr())
            out = self.graphs(key, z)
        return out


class StreamingEncoder(_CacheState):
    """Encode a clip as frame 0 then chunks of 4k frames (first chunk may be 1+4k)."""

    def __init__(self, vae: nn.Module, cache: list[torch.Tensor] | None = None):
        self.vae = vae
        self.cache: list[torch.Tensor] = [] if cache is None else cache
        self.first = True

    def reset(self) -> None:
        for t in self.cache:
            t.zero_()
        self.first = True

    @torch.no_grad()
    def encode_chunk(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels [B,3,t,H,W] -> normalised latent [B,z,t',H/8,W/8] (t'=(t-1)/4+1 first, t/4 after)."""
        t, step = video.shape[2], self.vae.temporal_factor
        if (t - 1 if self.first else t) % step or t == 0:
            want = f"1+{step}k" if self.first else f"a multiple of {step}"
            raise ValueError(f"chunk has {t} frames; this chunk needs {want}")
        cursor = ConvCache(self.cache, first=self.first)
        out = self.vae.encode_step(video, cursor)
        self.first = False
        return out
