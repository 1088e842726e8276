"""FlashVSR's LQ projector: low-res frames -> per-layer tokens added to the DiT's hidden states.

Each frame is pixel-unshuffled 16x16 (3 -> 768 channels at 1/16 resolution), then two causal
3-D convs (kernel (4, 3, 3), stride 2 in time, replicate padding) each followed by an RMS norm
over channels and SiLU, so 4 input frames make 1 latent frame, on the DiT's token grid (latent
/ 2 = pixels / 16). Per DiT layer l < layer_num a linear map gives the tokens added before
block l (released checkpoints: layer_num 1, block 0 only).

Streaming (upstream ``stream_forward``): the first call takes one frame, prepends 3 copies of
it, and only primes the caches (returns None); every later call takes 4 frames and returns one
latent frame of tokens. The two releases differ only in what the 2 front frames of each conv
are (``CausalConv3d``'s cache):

- ``causal`` (v1.1 ``Causal_LQ4x_Proj``): the previous call's last 2 frames (replicate padding
  on the first call), a true streaming causal conv;
- ``buffer`` (v1 ``Buffer_LQ4x_Proj``): the current call's own last 2 frames, so nothing
  crosses calls but the first call's priming of conv2.

Parameter names are those of ``LQ_proj_in.ckpt`` (conv1, norm1.gamma, conv2, norm2.gamma,
linear_layers.<l>); every size is read from its shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("causal", "buffer")
FIRST_CALL_REPEATS = 3   # upstream prepends 3 copies of frame 0 on the first call
FRAMES_PER_LATENT = 4    # two stride-2 convs in time


@dataclass(frozen=True)
class LQProjConfig:
    in_dim: int = 3
    unshuffle: int = 16
    hidden1: int = 2048
    hidden2: int = 3072
    out_dim: int = 1536
    layer_num: int = 1
    kernel: tuple[int, int, int] = (4, 3, 3)

    @classmethod
    def from_state_dict(cls, sd: Mapping, in_dim: int = 3, where: str = "LQ_proj_in") -> "LQProjConfig":
        """Sizes from the weight shapes. The input channels are in_dim * r * r (r = the unshuffle factor)."""
        need = ("conv1.weight", "conv2.weight", "linear_layers.0.weight")
        missing = [k for k in need if k not in sd]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)} (not an LQ_proj_in.ckpt state dict?)")
        c1, c2 = _shape(sd, "conv1.weight"), _shape(sd, "conv2.weight")
        r = math.isqrt(c1[1] // in_dim)
        if r * r * in_dim != c1[1]:
            raise ValueError(f"{where}: conv1 takes {c1[1]} channels, not {in_dim} x r^2 (a pixel-unshuffle of "
                             f"{in_dim}-channel frames)")
        layers = sum(1 for k in sd if k.startswith("linear_layers.") and k.endswith(".weight"))
        return cls(in_dim=in_dim, unshuffle=r, hidden1=c1[0], hidden2=c2[0],
                   out_dim=_shape(sd, "linear_layers.0.weight")[0], layer_num=layers, kernel=tuple(c1[2:]))


def _shape(sd: Mapping, key: str) -> tuple[int, ...]:
    v = sd[key]
    return tuple(v.shape)


class ChannelRMSNorm(nn.Module):
    """Upstream RMS_norm(images=False): x / ||x||_channels * sqrt(C) * gamma, gamma [C, 1, 1, 1]."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma


class CausalConv3d(nn.Conv3d):
    """Conv3d whose time axis is padded in front only: by ``front`` frames of cache (or of replicated
    frame 0 when there is no cache), space by k//2 replicated pixels."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int]):
        super().__init__(cin, cout, kernel, stride=(2, 1, 1))
        self.front = kernel[0] - self.stride[0]  # upstream 2 * padding_t = 2: T frames in -> T / 2 out
        self.space = (kernel[2] // 2, kernel[2] // 2, kernel[1] // 2, kernel[1] // 2)

    def forward(self, x, cache: torch.Tensor | None = None):
        front = self.front
        if cache is not None:
            x = torch.cat([cache, x], dim=2)
            front -= cache.shape[2]
        return super().forward(F.pad(x, self.space + (front, 0), mode="replicate"))


class LQProjector(nn.Module):
    def __init__(self, cfg: LQProjConfig):
        super().__init__()
        self.cfg = cfg
        cin = cfg.in_dim * cfg.unshuffle ** 2
        self.conv1 = CausalConv3d(cin, cfg.hidden1, cfg.kernel)
        self.norm1 = ChannelRMSNorm(cfg.hidden1)
        self.conv2 = CausalConv3d(cfg.hidden1, cfg.hidden2, cfg.kernel)
        self.norm2 = ChannelRMSNorm(cfg.hidden2)
        self.linear_layers = nn.ModuleList(nn.Linear(cfg.hidden2, cfg.out_dim) for _ in range(cfg.layer_num))

    @property
    def cache_frames(self) -> int:
        return self.conv1.front

    def unshuffle(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, C*r*r, T, H/r, W/r], channels ordered (c, row in cell, col in cell)."""
        b, c, t, h, w = x.shape
        r = self.cfg.unshuffle
        if h % r or w % r:
            raise ValueError(f"LQ frames of {h}x{w} px are not a multiple of the {r}x{r} pixel-unshuffle")
        x = x.reshape(b, c, t, h // r, r, w // r, r).permute(0, 1, 4, 6, 2, 3, 5)
        return x.reshape(b, c * r * r, t, h // r, w // r)

    def tokens(self, y: torch.Tensor) -> list[torch.Tensor]:
        """[B, C, f, h, w] -> per layer [B, f*h*w, out_dim] (token order (f, h, w))."""
        t = y.flatten(2).transpose(1, 2)
        return [lin(t) for lin in self.linear_layers]

    def open_stream(self, mode: str = "causal") -> "LQStream":
        return LQStream(self, mode)

    def forward(self, video: torch.Tensor, mode: str = "causal") -> list[torch.Tensor]:
        """Non-streaming: [B, C, 1+4n, H, W] -> per layer [B, n*h*w, out_dim], equal to the streamed calls
        [0:1], [1:5], ... concatenated (upstream forward)."""
        t = video.shape[2]
        if t < 1 + FRAMES_PER_LATENT or (t - 1) % FRAMES_PER_LATENT:
            raise ValueError(f"{t} LQ frames: the projector needs 1 + 4n frames (n >= 1)")
        stream = self.open_stream(mode)
        stream(video[:, :, :1])
        outs = [stream(video[:, :, a:a + FRAMES_PER_LATENT]) for a in range(1, t, FRAMES_PER_LATENT)]
        return [torch.cat(parts, dim=1) for parts in zip(*outs)]


class LQStream:
    """One video's projector state: the conv caches and whether the first (priming) call happened."""

    def __init__(self, proj: LQProjector, mode: str = "causal"):
        if mode not in MODES:
            raise ValueError(f"LQ projector mode must be one of {MODES}, got {mode!r}")
        self.proj, self.mode = proj, mode
        self.cache1: torch.Tensor | None = None
        self.cache2: torch.Tensor | None = None
        self.calls = 0

    def reset(self) -> None:
        self.cache1 = self.cache2 = None
        self.calls = 0

    def _conv(self, conv: CausalConv3d, x: torch.Tensor, cache: torch.Tensor | None):
        """Returns (conv output, the cache the next call sees)."""
        tail = x[:, :, -conv.front:]
        if self.mode == "buffer":
            cache = tail
        return conv(x, cache), tail

    def __call__(self, frames: torch.Tensor) -> list[torch.Tensor] | None:
        """frames [B, C, T, H, W] (call 0: T = 1; then T = 4) -> None on call 0, else per layer
        [B, h*w, out_dim] (one latent frame)."""
        p = self.proj
        want = 1 if self.calls == 0 else FRAMES_PER_LATENT
        if frames.shape[2] != want:
            raise ValueError(f"LQ projector call {self.calls} takes {want} frame(s), got {frames.shape[2]}")
        x = frames.to(p.conv1.weight.dtype)
        if self.calls == 0:
            x = torch.cat([x[:, :, :1].expand(-1, -1, FIRST_CALL_REPEATS, -1, -1), x], dim=2)
        y, self.cache1 = self._conv(p.conv1, p.unshuffle(x), self.cache1)
        y = F.silu(p.norm1(y))
        self.calls += 1
        if self.calls == 1:
            self.cache2 = y[:, :, -p.conv2.front:]
            return None
        z, self.cache2 = self._conv(p.conv2, y, self.cache2)
        return p.tokens(F.silu(p.norm2(z)))

    def project(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """Several calls in a row: frames [B, C, T, H, W] with T = 1 + 4n on the first use (the priming
        frame and n latent frames' worth), T = 4n after -> per layer [B, n*h*w, out_dim]."""
        start, outs = 0, []
        if self.calls == 0:
            self(frames[:, :, :1])
            start = 1
        t = frames.shape[2] - start
        if t <= 0 or t % FRAMES_PER_LATENT:
            raise ValueError(f"{frames.shape[2]} LQ frames: expected {'1 + ' if start else ''}a positive multiple "
                             f"of {FRAMES_PER_LATENT}")
        for a in range(start, frames.shape[2], FRAMES_PER_LATENT):
            outs.append(self(frames[:, :, a:a + FRAMES_PER_LATENT]))
        return [torch.cat(parts, dim=1) for parts in zip(*outs)]
