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

    def open_weights(self):
        from nodes.checkpoint import open_checkpoint
        from nodes.checkpoint.config_json import find_config_json
        ckpt = open_checkpoint(self.p.checkpoint)
        found = find_config_json(self.p.checkpoint, getattr(ckpt, "files", []))
        self._vae_config = found if found is not None and "base_dim" in found[1] else None
        return ckpt

    def build_from(self, checkpoint) -> Built:
        """Sizes from a diffusers AutoencoderKLWan config.json when there is one (base_dim, z_dim, dim_mult,
        num_res_blocks, temperal_downsample, latents_mean/std), else the Wan 2.1 VAE's, with width and z_dim
        from the weights."""
        from nodes.checkpoint.wan_layouts import wan21_vae_keymap

        from .vae import WanVAE
        self._stats = None
        cfg = getattr(self, "_vae_config", None)
        if cfg is not None:
            where, d = str(cfg[0]), cfg[1]
            kw = vae_kwargs_from_diffusers(d, where)
            self._stats = (d.get("latents_mean"), d.get("latents_std"))
        else:
            kw = dict(dim=_vae_dim(checkpoint), z_dim=_vae_z_dim(checkpoint, self.p.z_dim))
        keymap = None
        if "decoder.conv_in.weight" in checkpoint:
            keymap = wan21_vae_keymap(kw.get("num_res_blocks", 2), len(kw.get("dim_mult", (1, 2, 4, 4))))
        with torch.device("meta"):
            vae = WanVAE(**kw)
        return Built(vae, checkpoint, keymap)

    def constants(self, vae) -> None:
        """The latent mean/std are constants, not checkpoint entries: (re)create them on the device, from the
        config.json's latents_mean/std when it has them, else Wan 2.1's (16 latent channels only)."""
        mean, std = getattr(self, "_stats", None) or (None, None)
        if mean is None or std is None:
            if vae.z_dim != len(WAN21_LATENT_MEAN):
                if not self.random_weights:
                    raise FdError(f"node {self.name!r}: a {vae.z_dim}-channel VAE needs latents_mean/latents_std "
                                  "(its config.json); the Wan 2.1 values are for 16 channels")
                mean, std = [0.0] * vae.z_dim, [1.0] * vae.z_dim
            else:
                mean, std = WAN21_LATENT_MEAN, WAN21_LATENT_STD
        if len(mean) != vae.z_dim or len(std) != vae.z_dim:
            raise FdError(f"node {self.name!r}: latents_mean/std have {len(mean)}/{len(std)} entries for "
                          f"z_dim {vae.z_dim}")
        vae.latent_mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        vae.latent_std = torch.tensor(std, dtype=torch.float32, device=self.device)

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


def vae_kwargs_from_diffusers(d: dict, where: str = "config.json") -> dict:
    """WanVAE sizes from a diffusers ``AutoencoderKLWan`` config.json; a missing size is an error naming it."""
    need = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample")
    missing = [k for k in need if d.get(k) is None]
    if missing:
        raise FdError(f"{where}: missing {', '.join(missing)} (an AutoencoderKLWan config names every size)")
    if d.get("attn_scales"):
        raise FdError(f"{where}: attn_scales {d['attn_scales']} (attention in the down/up blocks) is not supported")
    if len(d["temperal_downsample"]) != len(d["dim_mult"]) - 1:
        raise FdError(f"{where}: temperal_downsample needs len(dim_mult) - 1 = {len(d['dim_mult']) - 1} entries")
    return dict(dim=int(d["base_dim"]), z_dim=int(d["z_dim"]), dim_mult=tuple(int(m) for m in d["dim_mult"]),
                num_res_blocks=int(d["num_res_blocks"]), temperal_downsample=tuple(bool(t) for t in
                                                                                   d["temperal_downsample"]))


def _vae_z_dim(sd: Mapping, default: int) -> int:
    for key in ("conv2.weight", "post_quant_conv.weight"):
        if key in sd:
            return (sd.shape(key) if hasattr(sd, "shape") else sd[key].shape)[0]
    return default


def _vae_dim(sd: Mapping) -> int:
    for key in ("encoder.conv1.weight", "encoder.conv_in.weight"):
        if key in sd:
            return sd.shape(key)[0] if hasattr(sd, "shape") else sd[key].shape[0]
    raise FdError("not a Wan 2.1 VAE checkpoint (no encoder.conv1.weight / encoder.conv_in.weight)")


class _WanVAEStreamNode(_WanVAENode):
    """A per-block node around one stream (vae_stream's StreamingDecoder / StreamingEncoder) kept in the session
    state under ``stream_key``. A snapshot is the stream's own state; a restore waits for the first block,
    which builds the stream on the VAE's device (``_open``)."""
    stream_key = "stream"

    def new_state(self):
        return {self.stream_key: None}

    def state_tensors(self, state) -> dict:
        if state.get("restore"):            # restored, no block run since: the snapshot's values are the state
            return dict(state["restore"])
        stream = state[self.stream_key]
        return {"started": False} if stream is None else {"started": True, **stream.state_tensors()}

    def load_state(self, state, values: dict):
        if values.get("started"):
            state["restore"] = values
        return state

    def _open(self, state, make):
        """The session's stream: ``make()``'s on the first block, with a pending restore applied."""
        if state[self.stream_key] is None:
            state[self.stream_key] = make()
            values = state.pop("restore", None)
            if values:
                state[self.stream_key].load_state(values)
        return state[self.stream_key]


class WanVAEDecodeNode(_WanVAEStreamNode):
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
        Param("chunk", int, 0, "latent frames per decoder call within a block (0: the whole block at once), after "
              "the clip's first latent frame, which goes alone; the frames are the same. A whole clip decoded in "
              "chunks of <= 5 gets every cuDNN plan tried (vae_stream.ALL_PLANS_MAX_LATENT_FRAMES) at a fraction "
              "of the one-shot memory", min=0),
    )
    capturable = True  # fixed-shape conv caches after the first block

    stream_key = "decoder"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._latest = None  # the latest session's stream, for graph_status()
        self._fused_ops: dict[bool, object] = {}   # compile? -> FusedOps shared by every session's stream

    def graph_status(self) -> str:
        return self._latest.graph_status() if self._latest is not None else "eager"

    def _new_stream(self, vae):
        from .vae_blocks import FusedOps
        from .vae_stream import StreamingDecoder
        on_cuda = vae.conv2.weight.is_cuda
        compile_glue = self.p.compile == "on" or (self.p.compile == "auto" and on_cuda)
        if compile_glue not in self._fused_ops:
            self._fused_ops[compile_glue] = FusedOps.make(compile_glue)
        self._latest = StreamingDecoder(vae, zero_init=self.p.mode == "demo", clamp=True, compile=compile_glue,
                                        fused_ops=self._fused_ops[compile_glue],
                                        graphs=self.p.graphs and on_cuda and self.ctx.capture)
        return self._latest

    def run(self, inputs, state, step):
        vae = self._vae()
        dec = self._open(state, lambda: self._new_stream(vae))
        z = self._layout(inputs["latent"].transpose(1, 2))
        frames = dec.decode_in_chunks(z, self.p.chunk).transpose(1, 2)
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


class WanVAEStreamEncodeNode(_WanVAEStreamNode):
    """Per-block video encode with the Wan VAE's causal conv caches carried between blocks (OmniDreams encodes
    each chunk's HD-map frames this way, with LightVAE: the same network at a quarter of the width, read from
    the weights). Block 0 takes 1 + 4(f - 1) frames, every later block 4f, so f latent frames come out per
    block and their concatenation equals one whole-clip encode."""
    type_name = "wan.vae_encode_stream"
    doc = ("Wan 2.1 VAE (or LightVAE) streaming encoder: each block's pixel frames to its latent frames, conv "
           "caches kept across blocks (OmniDreams' HD-map encoder).")
    inputs = (Port("frames", PIXELS, "this block's frames [B, T, 3, H, W] in [-1, 1]"),)
    outputs = (Port("latent", LATENT, "normalised latents [B, f, z, H/8, W/8]"),)
    params = _vae_params() + (
        Param("latent_frames", int, 2, "latent frames per block (the sampler's frames_per_block): block 0 takes "
              "1 + 4(f - 1) pixel frames, later blocks 4f", min=1),
    )

    stream_key = "encoder"

    def run(self, inputs, state, step):
        from .vae_stream import StreamingEncoder
        vae = self._vae()
        enc = self._open(state, lambda: StreamingEncoder(vae))
        f, t = self.p.latent_frames, vae.temporal_factor
        frames = inputs["frames"]
        want = 1 + t * (f - 1) if enc.first else t * f
        if frames.ndim != 5 or frames.shape[2] != 3 or frames.shape[1] != want:
            raise FdError(f"node {self.name!r}: block {step.block} got frames {list(frames.shape)}; it needs "
                          f"[B, {want}, 3, H, W] ({'1 + ' if enc.first else ''}{t} x "
                          f"{f - 1 if enc.first else f} pixel frames for {f} latent frames per block)")
        if frames.shape[3] % 8 or frames.shape[4] % 8:
            raise FdError(f"node {self.name!r}: frames of {frames.shape[3]}x{frames.shape[4]} px; the VAE needs "
                          "multiples of 8")
        with torch.no_grad():
            z = enc.encode_chunk(self._layout(frames.transpose(1, 2)))
        return {"latent": z.transpose(1, 2).float().contiguous()}


NODE_TYPES = (WanVAEDecodeNode, WanVAEEncodeNode, WanVAEStreamEncodeNode)
