"""`taehv.decode`: madebyollin's tiny Wan 2.1 autoencoder as a streaming per-block decoder.

Much cheaper than the Wan VAE (a preview-quality decoder, as in Self-Forcing's demo).
The MemBlock memory is carried in the session state, so block-by-block decoding equals
one full decode with upstream's leading-frame trim applied once (``mode: exact``);
``mode: demo`` is the demo's re-decode of the last 3 latents instead.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from engine.errors import FdError
from engine.node import Param, Port
from engine.types import LATENT, PIXELS
from nodes.common.model_node import Built, ModelNode
from nodes.common.params import checkpoint_param, dtype_param, require_loaded, seed_param

TAEW2_1 = "hf://lightx2v/Autoencoders/taew2_1.pth"


class TAEHVDecodeNode(ModelNode):
    type_name = "taehv.decode"
    doc = ("Streaming TAEHV decoder (taew2_1 / lighttaew2_1) for Wan 2.1 latents: fast preview-quality frames, "
           "memory carried across blocks (first block trimmed as upstream).")
    inputs = (Port("latent", LATENT, "latents of this block [B, f, C, h, w] (normalised, as the DiT makes them)"),)
    outputs = (Port("pixels", PIXELS, "frames [B, T, 3, 8h, 8w] in [-1, 1]"),)
    params = (
        checkpoint_param(TAEW2_1, "TAEHV weights (taew2_1.pth, lighttaew2_1.pth or a FlashDreams export)"),
        Param("family", str, "auto", "which latents the weights expect: taew2_1 (normalised), lighttaew2_1 (raw "
              "Wan latents); auto: lighttaew2_1 when the file name says 'lighttae'",
              choices=("auto", "taew2_1", "lighttaew2_1")),
        Param("mode", str, "exact", "exact: equals one full decode; demo: Self-Forcing demo's 3-latent warm-up",
              choices=("exact", "demo")),
        Param("channels", list, [256, 128, 64, 64], "decoder widths (random weights; read from checkpoints)"),
        Param("latent_channels", int, 16, "latent channels (random weights)", min=1),
        Param("fused", bool, True, "sub-pixel formulation of the upsample steps (same function, ~2x less work)"),
        Param("compile", bool, False, "torch.compile the block decode (CUDA; a few seconds of cold start)"),
        Param("graphs", bool, True, "on CUDA, replay every block after the first as a CUDA graph"),
        dtype_param(),
        seed_param(),
    )

    capturable = True  # fixed shapes per block; the MemBlock memory is passed through the graph

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stream = None

    def graph_status(self) -> str:
        return self.stream.graph_status() if self.stream is not None else "eager"

    def _family(self) -> str:
        if self.p.family != "auto":
            return self.p.family
        return "lighttaew2_1" if "lighttae" in Path(str(self.p.checkpoint)).name else "taew2_1"

    def _random_config(self):
        from .model import CHECKPOINT_LATENT_INPUT, TAEHVConfig
        if len(self.p.channels) != 4:
            raise FdError(f"node {self.name!r}: channels must list 4 decoder widths, got {self.p.channels}")
        return TAEHVConfig(latent_channels=self.p.latent_channels, encoder_channels=None,
                           decoder_channels=tuple(int(c) for c in self.p.channels),
                           latent_input=CHECKPOINT_LATENT_INPUT[self._family()])

    def build_random(self):
        from .model import TAEHV
        return TAEHV(self._random_config())

    def build_from(self, checkpoint) -> Built:
        from .model import CHECKPOINT_LATENT_INPUT, TAEHV, TAEHVConfig, remap_state_dict
        sd = dict(checkpoint.items())
        cfg = TAEHVConfig.from_state_dict(sd, latent_input=CHECKPOINT_LATENT_INPUT[self._family()])
        with torch.device("meta"):
            model = TAEHV(replace(cfg, encoder_channels=None))  # a decoder node: the encoder's keys are dropped
        return Built(model, remap_state_dict(sd, model))

    def constants(self, model) -> None:
        """Raw-latent weights (lighttaew2_1) normalise with Wan's latent statistics: buffers in no checkpoint."""
        if hasattr(model, "latent_std"):
            from .model import WAN21_LATENT_MEAN, WAN21_LATENT_STD
            model.latent_mean = torch.tensor(WAN21_LATENT_MEAN, device=self.device).view(1, 1, -1, 1, 1)
            model.latent_std = torch.tensor(WAN21_LATENT_STD, device=self.device).view(1, 1, -1, 1, 1)

    def loaded(self, model) -> None:
        from .stream import StreamingTAEHVDecoder
        self.model = model
        on_cuda = str(self.device).startswith("cuda")
        self.stream = StreamingTAEHVDecoder(
            model, mode=self.p.mode, signed_output=True, fused=self.p.fused, compile=self.p.compile and on_cuda,
            graphs=self.p.graphs and on_cuda and self.ctx.capture)

    def new_state(self):
        return None if self.stream is None else self.stream.new_state()

    def state_tensors(self, state) -> dict:
        from .stream import save_state
        return {} if state is None else save_state(state)

    def load_state(self, state, values: dict):
        from .stream import load_state
        return state if not values else load_state(state, values, self.device)

    def run(self, inputs, state, step):
        require_loaded(self, "stream")
        frames = self.stream.decode(state, inputs["latent"])
        return {"pixels": frames.float().clamp_(-1, 1)}


NODE_TYPES = (TAEHVDecodeNode,)
