"""TAEHV: madebyollin's tiny video autoencoder for Wan 2.1 latents (``taew2_1.pth``).

The decoder is a plain stack of per-frame 2D layers plus three temporal kinds:
``MemBlock`` (sees its own input one frame earlier), ``TGrow`` (one frame in,
``stride`` frames out) and, in the encoder, ``TPool`` (``stride`` frames in,
one out). Module indices and parameter names follow upstream's
``nn.Sequential`` exactly, so ``taew2_1.pth`` loads with ``strict=True``.

Everything temporal is run by :func:`run_layers`, a time-parallel pass whose
only state is, per MemBlock, the last frame of its input. Upstream's two modes
(``parallel=True``: zero past for the first frame; ``parallel=False``: a
frame-by-frame graph walk) are both this function, called once with empty
memory or once per latent frame with carried memory. The streaming decoder in
``stream.py`` calls it once per block.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from nodes.common.conv import interleave_phases, subpixel_weights

# Wan 2.1 VAE latent statistics. lightx2v's ``lighttaew2_1`` was trained on
# un-normalised latents (lightx2v sets ``need_scaled`` for "lighttae" paths and
# decodes ``z * std + mean``); madebyollin's ``taew2_1`` takes the normalised
# latents the DiT produces.
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

# Checkpoint layouts, as (source key prefix, our key prefix). taew2_1.pth and
# lightx2v's lighttaew2_1.pth both use upstream's flat ``decoder.<i>.*`` /
# ``encoder.<i>.*`` names; FlashDreams-exported state dicts wrap the
# Sequential in ``.blocks``. Both lighttae and taew2_1 store the first TGrow
# (decoder.7) with stride 2; ``remap_state_dict`` keeps its last-timestep rows.
KEY_PREFIX_REMAP: tuple[tuple[str, str], ...] = (
    ("decoder.blocks.", "decoder."),
    ("encoder.blocks.", "encoder."),
    ("taehv.decoder.", "decoder."),
    ("taehv.encoder.", "encoder."),
)

# Which latent normalisation each known checkpoint expects ("normalized": the
# DiT's latents as they are; "wan21_raw": multiply by std and add mean first).
CHECKPOINT_LATENT_INPUT = {"taew2_1": "normalized", "lighttaew2_1": "wan21_raw"}


def conv3x3(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3) before the first conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual conv block that also sees its input from the previous frame."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(
            conv3x3(n_in * 2, n_out), nn.ReLU(), conv3x3(n_out, n_out), nn.ReLU(), conv3x3(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TPool(nn.Module):
    """Merges ``stride`` consecutive frames (stacked on channels) into one."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.conv(x.reshape(-1, self.stride * c, h, w))


class TGrow(nn.Module):
    """Splits each frame into ``stride`` consecutive frames (channel groups, oldest first)."""

    def __init__(self, n_f: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


Memory = dict[int, torch.Tensor]  # MemBlock index -> last input frame [N, C, H, W]


def _upsample_fusable(layers: nn.Sequential, i: int) -> bool:
    """Is layers[i:i+3] nearest-x2 Upsample, TGrow, 3x3 pad-1 Conv2d (the decoder's up steps)?"""
    if i + 2 >= len(layers) or not isinstance(layers[i], nn.Upsample) or not isinstance(layers[i + 1], TGrow):
        return False
    up, conv = layers[i], layers[i + 2]
    return (up.mode == "nearest" and up.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0)) and isinstance(conv, nn.Conv2d)
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1)


def _up_tgrow_conv(tgrow: TGrow, conv: nn.Conv2d, h: torch.Tensor) -> torch.Tensor:
    """``conv(tgrow(upsample_x2(h)))`` on the low-res frames: TGrow is a 1x1 conv, so it commutes
    with the nearest upsample (4x less work), and upsample + 3x3 conv is one 2x2 sub-pixel conv
    (16 taps per low-res pixel instead of 36; the upsampled tensor is never written)."""
    h = tgrow(h)
    w4, bias = subpixel_weights(conv)
    y = F.conv2d(h, w4, bias, padding=1)                                  # [N, 4co, h+1, w+1]
    n, _, hh, ww = h.shape
    fmt = torch.channels_last if h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous() \
        else torch.contiguous_format
    out = torch.empty((n, w4.shape[0] // 4, 2 * hh, 2 * ww), dtype=y.dtype, device=y.device, memory_format=fmt)
    return interleave_phases(y, out)


def run_layers(layers: nn.Sequential, x: torch.Tensor, memory: Memory | None = None, fused: bool = False
               ) -> tuple[torch.Tensor, Memory]:
    """Apply ``layers`` to all frames of ``x`` [N, T, C, H, W] at once.

    Each MemBlock's past is its own input shifted one frame later in time; the
    first frame's past is ``memory[i]`` (zeros when absent, upstream's fresh
    start). Returns the output frames and the memory after the last frame.
    TPool needs the frame count at its depth to be a multiple of its stride.
    ``fused`` runs each Upsample-TGrow-Conv2d triple as ``_up_tgrow_conv`` (same function,
    different rounding).
    """
    n = x.shape[0]
    h = x.flatten(0, 1)
    new_memory: Memory = {}
    skip = 0
    for i, layer in enumerate(layers):
        if skip:
            skip -= 1
        elif fused and _upsample_fusable(layers, i):
            h, skip = _up_tgrow_conv(layers[i + 1], layers[i + 2], h), 2
        elif isinstance(layer, MemBlock):
            cur = h.unflatten(0, (n, -1))
            first = memory.get(i) if memory else None
            first = torch.zeros_like(cur[:, :1]) if first is None else first.unsqueeze(1)
            past = torch.cat([first, cur[:, :-1]], 1).flatten(0, 1)
            new_memory[i] = cur[:, -1].clone()  # clone: do not keep the whole block alive
            h = layer(h, past)
        else:
            h = layer(h)
    return h.unflatten(0, (n, -1)), new_memory


def time_upscale(layers: nn.Sequential) -> int:
    """Output frames per input frame of a decoder stack: the product of its TGrow strides."""
    s = 1
    for layer in layers:
        if isinstance(layer, TGrow):
            s *= layer.stride
    return s


def zero_memory(layers: nn.Sequential, x: torch.Tensor) -> Memory:
    """Explicit zero memory of every MemBlock of a decoder stack for input ``x`` [N, T, C, h, w]
    (spatial sizes followed through its Upsample layers; dtype and device of its first conv)."""
    n, _, _, h, w = x.shape
    w_ = next(layer.weight for layer in layers if isinstance(layer, nn.Conv2d))
    memory: Memory = {}
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Upsample):
            s = layer.scale_factor
            s = s if isinstance(s, (tuple, list)) else (s, s)
            h, w = int(h * s[0]), int(w * s[1])
        elif isinstance(layer, MemBlock):
            c = layer.conv[0].in_channels // 2
            memory[i] = torch.zeros((n, c, h, w), dtype=w_.dtype, device=w_.device)
    return memory


@dataclass(frozen=True)
class TAEHVConfig:
    latent_channels: int = 16
    image_channels: int = 3
    encoder_channels: int | None = 64  # None: decoder-only model
    decoder_channels: tuple[int, int, int, int] = (256, 128, 64, 64)
    decoder_time_upscale: tuple[bool, bool] = (True, True)
    decoder_space_upscale: tuple[bool, bool, bool] = (True, True, True)
    latent_input: str = "normalized"  # or "wan21_raw" (lighttaew2_1), see CHECKPOINT_LATENT_INPUT

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], **overrides) -> "TAEHVConfig":
        """Widths and channel counts from a (remapped) state dict's shapes."""
        sd = remap_state_dict(sd)
        dec = tuple(int(sd[f"decoder.{i}.weight"].shape[0]) for i in (1, 8, 14, 20))
        enc = int(sd["encoder.0.weight"].shape[0]) if "encoder.0.weight" in sd else None
        kw = dict(latent_channels=int(sd["decoder.1.weight"].shape[1]),
                  image_channels=int(sd["decoder.22.weight"].shape[0]),
                  encoder_channels=enc, decoder_channels=dec)
        kw.update(overrides)
        return cls(**kw)


class TAEHV(nn.Module):
    def __init__(self, cfg: TAEHVConfig = TAEHVConfig()):
        super().__init__()
        self.cfg = cfg
        lat, img = cfg.latent_channels, cfg.image_channels
        if cfg.encoder_channels is not None:
            e = cfg.encoder_channels
            self.encoder = nn.Sequential(
                conv3x3(img, e), nn.ReLU(),
                TPool(e, 2), conv3x3(e, e, stride=2, bias=False), MemBlock(e, e), MemBlock(e, e), MemBlock(e, e),
                TPool(e, 2), conv3x3(e, e, stride=2, bias=False), MemBlock(e, e), MemBlock(e, e), MemBlock(e, e),
                TPool(e, 1), conv3x3(e, e, stride=2, bias=False), MemBlock(e, e), MemBlock(e, e), MemBlock(e, e),
                conv3x3(e, lat),
            )
        n = cfg.decoder_channels
        t_up = (1, *(2 if u else 1 for u in cfg.decoder_time_upscale))
        s_up = tuple(2 if u else 1 for u in cfg.decoder_space_upscale)
        self.decoder = nn.Sequential(
            Clamp(), conv3x3(lat, n[0]), nn.ReLU(),
            MemBlock(n[0], n[0]), MemBlock(n[0], n[0]), MemBlock(n[0], n[0]),
            nn.Upsample(scale_factor=s_up[0]), TGrow(n[0], t_up[0]), conv3x3(n[0], n[1], bias=False),
            MemBlock(n[1], n[1]), MemBlock(n[1], n[1]), MemBlock(n[1], n[1]),
            nn.Upsample(scale_factor=s_up[1]), TGrow(n[1], t_up[1]), conv3x3(n[1], n[2], bias=False),
            MemBlock(n[2], n[2]), MemBlock(n[2], n[2]), MemBlock(n[2], n[2]),
            nn.Upsample(scale_factor=s_up[2]), TGrow(n[2], t_up[2]), conv3x3(n[2], n[3], bias=False),
            nn.ReLU(), conv3x3(n[3], img),
        )
        if cfg.latent_input == "wan21_raw":
            self.register_buffer("latent_mean", torch.tensor(WAN21_LATENT_MEAN).view(1, 1, -1, 1, 1), persistent=False)
            self.register_buffer("latent_std", torch.tensor(WAN21_LATENT_STD).view(1, 1, -1, 1, 1), persistent=False)
        elif cfg.latent_input != "normalized":
            raise ValueError(f"latent_input must be 'normalized' or 'wan21_raw', got {cfg.latent_input!r}")

    @property
    def t_upscale(self) -> int:
        """Output frames per latent frame (4 with the default flags)."""
        return time_upscale(self.decoder)

    @property
    def frames_to_trim(self) -> int:
        """Leading frames upstream drops after a fresh decode (the first latent's 4 -> 1)."""
        return self.t_upscale - 1

    def zero_memory(self, x: torch.Tensor) -> Memory:
        """The fresh-start memory for latents ``x`` [N, T, C, h, w] as explicit zeros (what
        ``run_layers`` uses when an entry is absent), so a first block has the same inputs as
        every later one: one compiled graph / captured graph serves both."""
        return zero_memory(self.decoder, x)

    def prepare_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Map DiT (normalised) latents [N, T, C, h, w] to what this checkpoint was trained on."""
        if self.cfg.latent_input == "wan21_raw":
            x = x * self.latent_std.to(x.dtype) + self.latent_mean.to(x.dtype)
        return x

    def decode_chunk(self, x: torch.Tensor, memory: Memory | None = None, fused: bool = False
                     ) -> tuple[torch.Tensor, Memory]:
        """Decode latents [N, T, C, h, w] continuing from ``memory``; raw output, no trim.

        Latents are cast to the model's device and dtype; output is in the model's dtype.
        ``fused``: the faster sub-pixel formulation of the upsample steps (``run_layers``).
        """
        w = self.decoder[1].weight
        return run_layers(self.decoder, self.prepare_latents(x.to(device=w.device, dtype=w.dtype)), memory, fused)

    def decode_video(self, x: torch.Tensor, parallel: bool = True) -> torch.Tensor:
        """[N, T, C, h, w] latents -> [N, 4T, 3, 8h, 8w], ~[0, 1], not clamped, not trimmed.

        ``parallel=False`` decodes one latent frame at a time (upstream's
        low-memory path); the two agree up to float rounding.
        """
        if parallel:
            return self.decode_chunk(x)[0]
        out, memory = [], None
        for t in range(x.shape[1]):
            y, memory = self.decode_chunk(x[:, t:t + 1], memory)
            out.append(y)
        return torch.cat(out, 1)

    def encode_video(self, x: torch.Tensor, parallel: bool = True) -> torch.Tensor:
        """[N, T, 3, H, W] frames in [0, 1] -> latents [N, T/4, C, H/8, W/8] (T a multiple of 4)."""
        if not hasattr(self, "encoder"):
            raise RuntimeError("this TAEHV was built without an encoder (decoder-only checkpoint)")
        w = self.encoder[0].weight
        x = x.to(device=w.device, dtype=w.dtype)
        if parallel:
            return run_layers(self.encoder, x)[0]
        step = 1
        for layer in self.encoder:
            if isinstance(layer, TPool):
                step *= layer.stride
        out, memory = [], None
        for t in range(0, x.shape[1], step):
            y, memory = run_layers(self.encoder, x[:, t:t + step], memory)
            out.append(y)
        return torch.cat(out, 1)


def remap_state_dict(sd: Mapping[str, torch.Tensor], model: TAEHV | None = None) -> dict[str, torch.Tensor]:
    """Bring a taew2_1 / lighttaew2_1 / FlashDreams state dict to our key names.

    With ``model``, TGrow weights stored for a larger stride than the model
    uses keep their last-timestep rows (what upstream's ``patch_tgrow_layers``
    does), and keys of a missing encoder are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        for src, dst in KEY_PREFIX_REMAP:
            if k.startswith(src):
                k = dst + k[len(src):]
                break
        out[k] = v
    if model is not None:
        for i, layer in enumerate(model.decoder):
            key = f"decoder.{i}.conv.weight"
            if isinstance(layer, TGrow) and key in out and out[key].shape[0] > layer.conv.weight.shape[0]:
                out[key] = out[key][-layer.conv.weight.shape[0]:]
        if not hasattr(model, "encoder"):
            out = {k: v for k, v in out.items() if not k.startswith("encoder.")}
    return out


def build_taehv(sd: Mapping[str, torch.Tensor], *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, checkpoint: str = "taew2_1",
                with_encoder: bool = True, **cfg_overrides) -> TAEHV:
    """Build on the meta device, then load ``sd`` strictly (assigning its tensors).

    ``checkpoint`` names the weights' family ("taew2_1" or "lighttaew2_1"),
    which fixes the expected latent normalisation; the key layout is the same.
    """
    cfg = TAEHVConfig.from_state_dict(sd, latent_input=CHECKPOINT_LATENT_INPUT[checkpoint], **cfg_overrides)
    if not with_encoder:
        cfg = replace(cfg, encoder_channels=None)
    with torch.device("meta"):
        model = TAEHV(cfg)
    model.load_state_dict(remap_state_dict(sd, model), strict=True, assign=True)
    if cfg.latent_input == "wan21_raw":  # non-persistent buffers are still on meta
        model.latent_mean = torch.tensor(WAN21_LATENT_MEAN).view(1, 1, -1, 1, 1)
        model.latent_std = torch.tensor(WAN21_LATENT_STD).view(1, 1, -1, 1, 1)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
