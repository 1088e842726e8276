"""`wan.vae_decode` (streaming, per block) and `wan.vae_encode` (once per session) on the Wan 2.1 VAE.

Decoding block by block with the conv caches carried in the session state gives the
same frames as decoding the whole latent video at once (``nodes.wan.vae_stream``):
the first block yields 1 + 4(f-1) frames, every later block 4f. ``mode: demo`` is
Self-Forcing's demo decoder instead (zero-initialised caches: 4f frames per block
from the first, not equal to the full decode).
"""
from __future__ import annotations

from typing import Mapping

import torch

from engine.errors import FdError
from engine.node import SESSION, Param, Port
from engine.types import IMAGE, LATENT, PIXELS
from nodes.common.model_node import Built, ModelNode
from nodes.common.params import checkpoint_param, dtype_param, seed_param

from .vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD

WAN21_VAE = "hf://Wan-AI/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth"


def _vae_params() -> tuple[Param, ...]:
    return (
        checkpoint_param(WAN21_VAE, "Wan 2.1 VAE weights (native Wan2.1_VAE.pth or diffusers AutoencoderKLWan)"),
        Param("dim", int, 96, "base width (96 for the real VAE; random weights may be tiny, e.g. 8)", min=1),
        Param("z_dim", int, 16, "latent channels", min=1),
        Param("channels_last", bool, True, "channels-last conv weights and activations (cuDNN / oneDNN fast "
              "paths; about 6x faster on CPU)"),
        dtype_param(),
        seed_param(),
    )


class _WanVAENode(ModelNode):
    """Shared loading of the Wan VAE for the encode and decode nodes (the recipe is ModelNode's)."""

    def build_random(self):
        from .vae import WanVAE
        return WanVAE(dim=self.p.dim, z_dim=self.p.z_dim)

    def build_from(self, checkpoint) -> Built:
        from nodes.checkpoint.wan_layouts import VAE_DIFFUSERS_TO_NATIVE

        from .vae import WanVAE
        keymap = VAE_DIFFUSERS_TO_NATIVE if "decoder.conv_in.weight" in checkpoint else None
        with torch.device("meta"):
            vae = WanVAE(dim=_vae_dim(checkpoint), z_dim=self.p.z_dim)
        return Built(vae, checkpoint, keymap)

    def constants(self, vae) -> None:
        """The latent mean/std are constants, not checkpoint entries: (re)create them on the device."""
        vae.latent_mean = torch.tensor(WAN21_LATENT_MEAN, dtype=torch.float32, device=self.device)
        vae.latent_std = torch.tensor(WAN21_LATENT_STD, dtype=torch.float32, device=self.device)

    def finish(self, vae):
        return vae.to_channels_last() if self.p.channels_last else vae

    @property
    def vae(self):
        return self.model

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] on the VAE's device/dtype, in the memory format its weights use."""
        w = self.vae.conv2.weight
        x = x.to(w.device, w.dtype)
        return x.contiguous(memory_format=torch.channels_last_3d) if self.p.channels_last else x.contiguous()

    def _vae(self):
        return self.require_model()


def _vae_dim(sd: Mapping) -> int:
    for key in ("encoder.conv1.weight", "encoder.conv_in.weight"):
        if key in sd:
            return sd.shape(key)[0] if hasattr(sd, "shape") else sd[key].shape[0]
    raise FdError("not a Wan 2.1 VAE checkpoint (no encoder.conv1.weight / encoder.conv_in.weight)")


class WanVAEDecodeNode(_WanVAENode):
    type_name = "wan.vae_decode"
    doc = ("Streaming Wan 2.1 VAE decoder: each block's latents to frames, conv caches carried across blocks, so the "
           "stream equals one full decode (first block 1+4(f-1) frames, later 4f).")
    inputs = (Port("latent", LATENT, "latents of this block [B, f, C, h, w]"),)
    outputs = (Port("pixels", PIXELS, "frames [B, T, 3, 8h, 8w] in [-1, 1]"),)
    params = _vae_params() + (
        Param("mode", str, "exact", "exact: equals the full decode; demo: Self-Forcing demo decoder (zero caches)",
              choices=("exact", "demo")),
        Param("graphs", bool, True, "on CUDA, replay every block after the first as a CUDA graph"),
        Param("compile", str, "auto", "torch.compile the pointwise glue between convs (auto = on CUDA; ~10 s of "
              "cold start, ~1.4x faster decode)", choices=("auto", "on", "off")),
    )
    capturable = True  # fixed-shape conv caches after the first block

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._latest = None  # the latest session's stream, for graph_status()

    def new_state(self):
        return {"decoder": None}

    def graph_status(self) -> str:
        return self._latest.graph_status() if self._latest is not None else "eager"

    def state_tensors(self, state) -> dict:
        if state.get("restore"):            # restored, no block decoded since
            return dict(state["restore"])
        dec = state["decoder"]
        return {"started": False} if dec is None else {"started": True, **dec.state_tensors()}

    def load_state(self, state, values: dict):
        """Deferred to the first block: the stream is built there, on the VAE's device."""
        if values.get("started"):
            state["restore"] = values
        return state

    def run(self, inputs, state, step):
        from .vae_stream import StreamingDecoder
        vae = self._vae()
        if state["decoder"] is None:
            on_cuda = vae.conv2.weight.is_cuda
            compile_glue = self.p.compile == "on" or (self.p.compile == "auto" and on_cuda)
            state["decoder"] = self._latest = StreamingDecoder(vae, zero_init=self.p.mode == "demo", clamp=True,
                                                               compile=compile_glue,
                                                               graphs=self.p.graphs and on_cuda and
                                                               self.ctx.capture)
            if state.get("restore"):
                state["decoder"].load_state(state.pop("restore"))
        frames = state["decoder"].decode_chunk(self._layout(inputs["latent"].transpose(1, 2))).transpose(1, 2)
        if self.p.mode == "demo" and step.block == 0:
            frames = frames[:, vae.temporal_factor - 1:]  # the demo drops the first latent's extra frames
        return {"pixels": frames.float().contiguous()}


class WanVAEEncodeNode(_WanVAENode):
    type_name = "wan.vae_encode"
    doc = ("Wan 2.1 VAE encoder for image conditioning: an image to its normalised latent frame (Causal-Forcing I2V "
           "initial latent), or to Wan 2.1 I2V's `y` (mask channels + latents of the image followed by black frames).")
    inputs = (Port("image", IMAGE, "image [B, 3, H, W] in [-1, 1]"),)
    outputs = (Port("latent", LATENT, "image: [B, 1, z, H/8, W/8]; i2v_condition: [B, F, 4 + z, H/8, W/8]"),)
    params = _vae_params() + (
        Param("mode", str, "image", "image: the image's latent frame; i2v_condition: Wan 2.1 I2V y",
              choices=("image", "i2v_condition")),
        Param("frames", int, 81, "i2v_condition: pixel frames of the video (1 + 4k)", min=1),
    )
    phase = SESSION

    def run(self, inputs, state, step):
        vae = self._vae()
        img = inputs["image"]
        if self.p.mode == "image":
            with torch.no_grad():
                z = vae.encode(self._layout(img.unsqueeze(2)))
            return {"latent": z.transpose(1, 2).float().contiguous()}
        b, _, hh, ww = img.shape
        t = vae.temporal_factor
        if (self.p.frames - 1) % t:
            raise FdError(f"node {self.name!r}: frames={self.p.frames} must be 1 + {t}k")
        video = torch.cat([img.unsqueeze(2), img.new_zeros(b, 3, self.p.frames - 1, hh, ww)], dim=2)
        with torch.no_grad():
            z = vae.encode(self._layout(video)).float().contiguous()  # [B, z, F, h, w]
        mask = torch.zeros(b, t, z.shape[2], z.shape[3], z.shape[4], device=z.device)
        mask[:, :, 0] = 1.0  # Wan: the first pixel frame is given, repeated over the first latent's t frames
        return {"latent": torch.cat([mask, z], dim=1).transpose(1, 2).contiguous()}


NODE_TYPES = (WanVAEDecodeNode, WanVAEEncodeNode)
