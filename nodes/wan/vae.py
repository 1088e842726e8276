"""Wan 2.1 video VAE (upstream ``WanVAE_``): causal 3-D conv encoder/decoder.

The module carries the checkpoint's parameters (``encoder.*``, ``conv1.*``, ``conv2.*``,
``decoder.*``) and the 16 per-channel latent statistics; all temporal state lives in
the streaming objects of ``nodes.wan.vae_stream``, which ``encode``/``decode`` use
with upstream's chunking (encode: frame 0, then 4 frames; decode: 1 latent frame).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from .vae_blocks import CausalConv3d, ConvCache, Decoder3d, Encoder3d
from .vae_stream import StreamingDecoder, StreamingEncoder

# Per-channel latent statistics of Wan 2.1 (wan/modules/vae.py WanVAE, utils/wan_wrapper.py).
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


class WanVAE(nn.Module):
    """Wan 2.1 VAE. Latents are normalised: (mu - mean) / std per channel."""

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, attn_scales: Sequence[float] = (),
                 temperal_downsample: Sequence[bool] = (False, True, True),
                 dropout: float = 0.0,
                 latent_mean: Sequence[float] | torch.Tensor | None = None,
                 latent_std: Sequence[float] | torch.Tensor | None = None):
        super().__init__()
        del dropout  # inference only; kept so upstream's config dict can be splatted
        self.z_dim = z_dim
        self.temporal_factor = 2 ** sum(bool(t) for t in temperal_downsample)
        self.spatial_factor = 2 ** (len(dim_mult) - 1)
        self.encoder = Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, attn_scales,
                                 temperal_downsample)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, attn_scales,
                                 list(temperal_downsample)[::-1])
        # Not in the checkpoint: constants, so strict loading of Wan2.1_VAE.pth works.
        self.register_buffer("latent_mean", torch.empty(z_dim), persistent=False)
        self.register_buffer("latent_std", torch.empty(z_dim), persistent=False)
        if latent_mean is None:   # Wan 2.1's statistics for 16 channels; a placeholder (0, 1) for others
            latent_mean = WAN21_LATENT_MEAN if z_dim == len(WAN21_LATENT_MEAN) else [0.0] * z_dim
        if latent_std is None:
            latent_std = WAN21_LATENT_STD if z_dim == len(WAN21_LATENT_STD) else [1.0] * z_dim
        self.set_latent_stats(latent_mean, latent_std)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], **overrides) -> "WanVAE":
        """Build with dim / z_dim read from the weights, load strictly, eval mode."""
        conv = sd.get("encoder.conv1.weight")
        dim = conv.shape[0] if conv is not None else sd["decoder.head.2.weight"].shape[1]
        cfg = dict(dim=dim, z_dim=sd["conv2.weight"].shape[0])
        cfg.update(overrides)
        model = cls(**cfg)
        model.load_state_dict(sd, strict=True)
        return model.eval().requires_grad_(False)

    def set_latent_stats(self, mean, std) -> None:
        """Override the per-channel latent mean/std (e.g. for a fine-tuned VAE)."""
        self.latent_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.latent_std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def to_channels_last(self) -> "WanVAE":
        """Store conv weights channels-last (NDHWC / NHWC) for cuDNN's fast paths; feed
        channels_last_3d inputs too (the stream caches follow the input's format)."""
        for p in self.parameters():
            if p.dim() == 5:
                p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
            elif p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        return self

    def _stat(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.dtype).view(1, self.z_dim, 1, 1, 1)

    # -- one chunk with explicit caches (the streaming classes drive these) --------

    def encode_step(self, video: torch.Tensor, cache: ConvCache) -> torch.Tensor:
        """Frames [B,3,t,H,W] -> normalised latent frames, advancing ``cache``."""
        mu = self.conv1(self.encoder(video, cache))[:, : self.z_dim]
        # upstream multiplies by 1/std (scale[1]); kept for bit-level agreement
        return (mu - self._stat(self.latent_mean, mu)) * (1.0 / self._stat(self.latent_std, mu))

    def decode_step(self, latent: torch.Tensor, cache: ConvCache) -> torch.Tensor:
        """Normalised latent frames [B,z,f,h,w] -> pixels (unclamped), advancing ``cache``."""
        z = latent / (1.0 / self._stat(self.latent_std, latent)) + self._stat(self.latent_mean, latent)
        return self.decoder(self.conv2(z), cache)

    # -- whole clips --------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B,3,T,H,W] in [-1,1] -> [B,z,1+(T-1)//4,H/8,W/8]; trailing frames past 1+4k are
        ignored, as upstream does."""
        enc = StreamingEncoder(self)
        t = self.temporal_factor
        n = 1 + (video.shape[2] - 1) // t
        chunks = [enc.encode_chunk(video[:, :, :1])]
        chunks += [enc.encode_chunk(video[:, :, 1 + t * (i - 1): 1 + t * i]) for i in range(1, n)]
        return torch.cat(chunks, dim=2)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, clamp: bool = False, chunk: int = 1) -> torch.Tensor:
        """[B,z,F,h,w] -> [B,3,1+4(F-1),8h,8w]; ``chunk`` latent frames per pass (memory)."""
        dec = StreamingDecoder(self, clamp=clamp)
        outs = [dec.decode_chunk(latent[:, :, s: s + chunk])
                for s in range(0, latent.shape[2], chunk)]
        return torch.cat(outs, dim=2)
