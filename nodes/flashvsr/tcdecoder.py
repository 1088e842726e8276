"""FlashVSR's TCDecoder: a TAEHV-shaped decoder that also sees the low-resolution video it upscales.

Upstream (``examples/WanVSR/utils/TCDecoder.py``) takes TAEHV's decoder, widens it
([512, 256, 128, 128] in the release) and deepens it: every top-level ReLU is followed by
one more 3x3 conv (initialised to identity, trained since) and another ReLU, which gives
27 layers instead of 23. Its input has ``16 + 768`` channels per latent frame: the LQ
frames of that latent frame's output, pixel-unshuffled by (4, 8, 8) (4 frames x 8 x 8
pixels x RGB = 768 channels), stacked BEFORE the 16 latent channels.

Everything temporal is TAEHV's: MemBlock / TGrow and :func:`nodes.taehv.model.run_layers`,
which carries the MemBlock memory across calls, so streaming a chunk at a time through
``nodes.taehv.stream.StreamingTAEHVDecoder`` (this module duck-types the model it drives)
equals one decode of everything, with the 3 leading frames dropped once.

The unshuffle factors are not free parameters: the LQ cond must land on the latent grid,
so its time factor is the decoder's TGrow product and its space factor the Upsample
product. Both, the widths and the 16 latent channels are read from the weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn

from nodes.taehv.model import Clamp, MemBlock, Memory, TGrow, conv3x3, run_layers, time_upscale, zero_memory


def _deepen(layers: list[nn.Module]) -> list[nn.Module]:
    """Insert (3x3 conv, no bias, same width) + ReLU after every top-level ReLU, as upstream does."""
    out: list[nn.Module] = []
    for layer in layers:
        out.append(layer)
        if isinstance(layer, nn.ReLU):
            prev = out[-2]
            width = prev.out_channels if isinstance(prev, nn.Conv2d) else prev.conv[-1].out_channels
            out += [conv3x3(width, width, bias=False), nn.ReLU()]
    return out


def decoder_layers(channels: tuple[int, int, int, int], in_channels: int, image_channels: int = 3,
                   time_up: tuple[bool, bool] = (True, True),
                   space_up: tuple[bool, bool, bool] = (True, True, True)) -> nn.Sequential:
    """The deepened decoder stack; indices match TCDecoder.ckpt's ``decoder.<i>.*`` keys."""
    n = channels
    t = (1, *(2 if u else 1 for u in time_up))
    s = tuple(2 if u else 1 for u in space_up)
    base = [Clamp(), conv3x3(in_channels, n[0]), nn.ReLU()]
    for i in range(3):
        base += [MemBlock(n[i], n[i]) for _ in range(3)]
        base += [nn.Upsample(scale_factor=s[i]), TGrow(n[i], t[i]), conv3x3(n[i], n[i + 1], bias=False)]
    base += [nn.ReLU(), conv3x3(n[3], image_channels)]
    return nn.Sequential(*_deepen(base))


def _width_convs(layers: nn.Sequential) -> tuple[int, list[int], int]:
    """Indices of the input conv, the three post-TGrow convs (widths n1..n3) and the output conv."""
    convs = [i for i, layer in enumerate(layers) if type(layer) is nn.Conv2d]
    tgrows = [i for i, layer in enumerate(layers) if isinstance(layer, TGrow)]
    return convs[0], [g + 1 for g in tgrows], convs[-1]


@dataclass(frozen=True)
class TCDecoderConfig:
    channels: tuple[int, int, int, int] = (512, 256, 128, 128)
    latent_channels: int = 16          # the DiT's latents; the rest of the input is the LQ cond
    cond_channels: int = 768           # image_channels * t_up * s_up * s_up
    image_channels: int = 3

    @property
    def in_channels(self) -> int:
        return self.latent_channels + self.cond_channels

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], latent_channels: int = 16) -> "TCDecoderConfig":
        """Widths and channel counts from the weights' shapes (layer indices from the layout itself)."""
        with torch.device("meta"):
            probe = decoder_layers((1, 1, 1, 1), 1)
        first, mids, last = _width_convs(probe)
        w0 = sd[f"decoder.{first}.weight"]
        widths = (int(w0.shape[0]), *(int(sd[f"decoder.{i}.weight"].shape[0]) for i in mids))
        image = int(sd[f"decoder.{last}.weight"].shape[0])
        return cls(channels=widths, latent_channels=latent_channels,
                   cond_channels=int(w0.shape[1]) - latent_channels, image_channels=image)


class TCDecoder(nn.Module):
    """Decoder-only, LQ-conditioned TAEHV. Driven by ``StreamingTAEHVDecoder`` like a TAEHV."""

    def __init__(self, cfg: TCDecoderConfig = TCDecoderConfig()):
        super().__init__()
        self.cfg = cfg
        self.decoder = decoder_layers(cfg.channels, cfg.in_channels, cfg.image_channels)
        ft, fs = self.cond_factors
        expect = cfg.image_channels * ft * fs * fs
        if cfg.cond_channels != expect:
            raise ValueError(f"TCDecoder: the first conv takes {cfg.in_channels} channels = {cfg.latent_channels} "
                             f"latent + {cfg.cond_channels}, but the LQ cond unshuffled by ({ft}, {fs}, {fs}) has "
                             f"{expect} (is latent_channels right?)")

    @property
    def t_upscale(self) -> int:
        return time_upscale(self.decoder)

    @property
    def s_upscale(self) -> int:
        s = 1
        for layer in self.decoder:
            if isinstance(layer, nn.Upsample):
                f = layer.scale_factor
                s *= int(f[0] if isinstance(f, (tuple, list)) else f)
        return s

    @property
    def cond_factors(self) -> tuple[int, int]:
        """(frames, pixels) per latent cell of the LQ cond: (4, 8) for the released decoder."""
        return self.t_upscale, self.s_upscale

    @property
    def frames_to_trim(self) -> int:
        """Leading frames dropped after the first decode of a stream (the first latent's 4 -> 1)."""
        return self.t_upscale - 1

    def zero_memory(self, x: torch.Tensor) -> Memory:
        return zero_memory(self.decoder, x)

    def prepare_latents(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def unshuffle_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """LQ frames [N, F, C, H, W] -> [N, ceil(F/ft), C*ft*fs*fs, H/fs, W/fs] in upstream's channel order
        (c, frame, row, column). F is left-padded to a multiple of ft with copies of its first frame, as
        upstream's PixelShuffle3d does (21 LQ frames of a first chunk -> 3 copies + 21 = 6 latent frames)."""
        ft, fs = self.cond_factors
        n, f, c, h, w = cond.shape
        if h % fs or w % fs:
            raise ValueError(f"LQ frames {h}x{w} are not a multiple of the decoder's {fs}x upscale")
        if f % ft:
            cond = torch.cat([cond[:, :1].expand(n, ft - f % ft, c, h, w), cond], 1)
        x = cond.reshape(n, -1, ft, c, h // fs, fs, w // fs, fs)        # n, f', ft, c, h', fs, w', fs
        x = x.permute(0, 1, 3, 2, 5, 7, 4, 6)                            # n, f', c, ft, fs, fs, h', w'
        return x.reshape(n, x.shape[1], c * ft * fs * fs, h // fs, w // fs)

    def decoder_input(self, latents: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """[LQ cond | latents] on the channel axis: [N, T, cond + latent channels, h, w]."""
        c = self.unshuffle_cond(cond.to(latents.dtype))
        if c.shape[1] != latents.shape[1] or c.shape[-2:] != latents.shape[-2:]:
            raise ValueError(f"LQ cond of {cond.shape[1]} frames {tuple(cond.shape[-2:])} unshuffles to "
                             f"{c.shape[1]} latent frames {tuple(c.shape[-2:])}, but the latents are "
                             f"{latents.shape[1]} frames {tuple(latents.shape[-2:])}")
        return torch.cat([c, latents], 2)

    def decode_chunk(self, x: torch.Tensor, memory: Memory | None = None, fused: bool = False
                     ) -> tuple[torch.Tensor, Memory]:
        """``x`` = ``decoder_input(latents, cond)`` [N, T, C, h, w] -> frames [N, 4T, 3, 8h, 8w] ~[0, 1]."""
        w = self.decoder[1].weight
        return run_layers(self.decoder, x.to(device=w.device, dtype=w.dtype), memory, fused)


def build_tcdecoder(sd: Mapping[str, torch.Tensor], *, latent_channels: int = 16,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TCDecoder:
    """Build on meta from ``sd``'s shapes and load it strictly (tests, scripts; nodes use ModelNode)."""
    with torch.device("meta"):
        model = TCDecoder(TCDecoderConfig.from_state_dict(sd, latent_channels))
    model.load_state_dict(dict(sd), strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
