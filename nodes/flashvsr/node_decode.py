"""`flashvsr.decode`: FlashVSR's TCDecoder (latents + the LQ frames they upscale -> HR frames) with colour fix.

Per block it decodes the DiT's clean latents of one (or more, or zero) FlashVSR chunks,
conditioned on the LQ frames those output frames come from (``video.input``'s ``cond``
port), carrying the MemBlock memory across blocks, and colour-corrects every output frame
against its LQ frame (AdaIN by default, as both upstream pipelines call it).

Frame bookkeeping, as upstream v1.1 (``flashvsr_tiny_long.py``): the first block's f
latents give 4f - 3 frames (the fresh decoder drops 3) from 4f - 3 LQ frames; every later
block's f latents give 4f frames from 4f LQ frames. Decoding chunk by chunk equals one
decode of all of them (upstream v1 decodes once at the end), so a block may carry any
number of chunks, including none (a chained spec whose source has not filled a chunk yet).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import FdError
from engine.node import Param, Port
from engine.types import LATENT, PIXELS
from nodes.common.model_node import Built, ModelNode
from nodes.common.params import checkpoint_param, dtype_param, require_loaded, seed_param

from .color import METHODS

TCDECODER = "hf://JunhaoZhuang/FlashVSR-v1.1/TCDecoder.ckpt"


@dataclass
class _DecodeState:
    stream: Any            # nodes.taehv.stream.TAEHVStreamState (MemBlock memory, blocks decoded)
    frames_out: int = 0


class FlashVSRDecodeNode(ModelNode):
    type_name = "flashvsr.decode"
    doc = ("FlashVSR TCDecoder: DiT latents + their LQ frames -> upscaled frames, streaming (MemBlock memory "
           "across blocks, 3 leading frames dropped once), colour-corrected against the LQ frames.")
    inputs = (
        Port("latent", LATENT, "clean latents of this block's chunk(s) [B, f, 16, h, w] (f may be 0)"),
        Port("cond", PIXELS, "the LQ frames of this block's output [B, 4f(-3 on the first block), 3, 8h, 8w] "
             "in [-1, 1] (video.input's cond port)"),
    )
    outputs = (Port("pixels", PIXELS, "upscaled frames [B, T, 3, 8h, 8w] in [-1, 1]"),)
    params = (
        checkpoint_param(TCDECODER, "TCDecoder weights (FlashVSR's TCDecoder.ckpt)"),
        Param("channels", list, [512, 256, 128, 128], "decoder widths (random weights; read from checkpoints)"),
        Param("latent_channels", int, 16, "latent channels of the DiT; the rest of the decoder's input channels "
              "are the unshuffled LQ frames", min=1),
        Param("color_fix", str, "adain", "colour correction against the LQ frames: adain (what upstream runs), "
              "wavelet (low frequencies from the LQ), none", choices=METHODS),
        Param("fused", bool, True, "sub-pixel formulation of the upsample steps (same function, less work)"),
        Param("compile", bool, False, "torch.compile the block decode (CUDA; a few seconds of cold start)"),
        Param("graphs", bool, True, "on CUDA, replay blocks of a seen shape as CUDA graphs"),
        dtype_param(),
        seed_param(),
    )
    capturable = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stream = None

    # ------------------------------------------------------------------ model
    def _random_config(self):
        from .tcdecoder import TCDecoderConfig
        if len(self.p.channels) != 4:
            raise FdError(f"node {self.name!r}: channels must list 4 decoder widths, got {self.p.channels}")
        return TCDecoderConfig(channels=tuple(int(c) for c in self.p.channels), latent_channels=self.p.latent_channels)

    def build_random(self):
        from .tcdecoder import TCDecoder
        return TCDecoder(self._random_config())

    def build_from(self, checkpoint) -> Built:
        from .tcdecoder import TCDecoder, TCDecoderConfig
        try:
            cfg = TCDecoderConfig.from_state_dict(_Shapes(checkpoint), self.p.latent_channels)
            with torch.device("meta"):
                model = TCDecoder(cfg)
        except (KeyError, ValueError) as e:
            raise FdError(f"node {self.name!r} ({self.type_name}): {self.p.checkpoint} is not a TCDecoder "
                          f"checkpoint: {e}") from None
        return Built(model, checkpoint)

    def loaded(self, model) -> None:
        from nodes.taehv.stream import StreamingTAEHVDecoder
        self.model = model
        on_cuda = str(self.device).startswith("cuda")
        self.stream = StreamingTAEHVDecoder(
            model, mode="exact", signed_output=True, fused=self.p.fused, compile=self.p.compile and on_cuda,
            graphs=self.p.graphs and on_cuda and self.ctx.capture)

    def graph_status(self) -> str:
        return self.stream.graph_status() if self.stream is not None else "eager"

    # ------------------------------------------------------------------ state
    def new_state(self):
        return None if self.stream is None else _DecodeState(self.stream.new_state())

    def state_tensors(self, state) -> dict:
        from nodes.taehv.stream import save_state
        return {} if state is None else {"frames_out": state.frames_out, **save_state(state.stream)}

    def load_state(self, state, values: dict):
        from nodes.taehv.stream import load_state
        if not values:
            return state
        state.frames_out = int(values.pop("frames_out"))
        load_state(state.stream, values, self.device)
        return state

    # ------------------------------------------------------------------ run
    def run(self, inputs, state: _DecodeState, step):
        from .color import color_correct
        stream = require_loaded(self, "stream")
        latent, cond = inputs["latent"], inputs["cond"]
        first = state.stream.blocks_decoded == 0
        f = int(latent.shape[1])
        want = self.model.t_upscale * f - (self.model.frames_to_trim if first and f else 0)
        if cond.shape[1] != want:
            raise FdError(f"node {self.name!r} ({self.type_name}), block {step.block}: {f} latent frames decode to "
                          f"{want} frames{' (the first decode drops some)' if first and f else ''}, but `cond` has "
                          f"{cond.shape[1]} LQ frames (wire video.input's cond port, not its frames port)")
        if f == 0:
            h, w = cond.shape[-2:]
            return {"pixels": torch.zeros((latent.shape[0], 0, 3, h, w), device=cond.device)}
        with torch.no_grad():
            x = self.model.decoder_input(latent.to(device=self.device, dtype=self.dtype),
                                         cond.to(device=self.device, dtype=self.dtype))
            frames = stream.decode(state.stream, x).float()
            frames = color_correct(frames, cond.to(frames.device, torch.float32), self.p.color_fix)
        state.frames_out += frames.shape[1]
        return {"pixels": frames}


class _Shapes:
    """A checkpoint seen through its shapes only, so the config is read without loading tensors."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint

    def __getitem__(self, key: str):
        shape = self.checkpoint.shape(key) if hasattr(self.checkpoint, "shape") else self.checkpoint[key].shape
        return torch.empty(shape, device="meta")


NODE_TYPES = (FlashVSRDecodeNode,)
