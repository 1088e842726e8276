"""Streaming FlashVSR: LQ frames in, clean latents out, one DiT call per chunk.

Upstream (pipelines/flashvsr_tiny_long.py) per chunk i:

    lq_latents = LQ_proj_in.stream_forward(...) over the chunk's LQ frames   # 25 frames, then 8
    flow = model_fn_wan_video(dit, noise chunk, t=1000, LQ_latents, window cache, RoPE frames 0 | 4+2i)
    x0 = noise chunk - flow                                                  # one step, sigma(1000) = 1

The prompt is a fixed embedding (``posi_prompt.pth``) whose cross-attention K/V is computed once,
as are the time terms of t = 1000. ``FlashVSRModel`` is the loaded handle a node passes on;
``FlashVSRStream`` one video's state (window cache, LQ projector caches, chunk counter).
"""
from __future__ import annotations

import torch

from .config import (CALL_FRAMES, CALL_LQ_FRAMES, FIRST_CALL_FRAMES, FIRST_CALL_LQ_FRAMES, StreamSettings,
                     call_frame_start)
from .dit import FlashVSRDiT, WindowKVCache
from .lq_proj import LQProjector

TIMESTEP = 1000.0
PIXELS_PER_LATENT = 8   # the Wan VAE's (and TCDecoder's) spatial factor


class FlashVSRModel:
    """The loaded DiT, LQ projector and prompt embedding, with their per-model derived tensors."""

    def __init__(self, dit: FlashVSRDiT, lq_proj: LQProjector, prompt: torch.Tensor):
        if lq_proj.cfg.out_dim != dit.cfg.dim:
            raise ValueError(f"the LQ projector outputs {lq_proj.cfg.out_dim} channels, the DiT's width is "
                             f"{dit.cfg.dim} (projector and DiT from different releases?)")
        if prompt.shape[-1] != dit.cfg.text_dim:
            raise ValueError(f"the prompt embedding is {prompt.shape[-1]}-d, the DiT takes {dit.cfg.text_dim}-d text")
        self.dit, self.lq_proj = dit, lq_proj
        device = dit.patch_embedding.weight.device
        self.prompt = prompt if prompt.dim() == 3 else prompt[None]
        with torch.no_grad():
            self.cross = dit.prepare_prompt(self.prompt.to(device))
            self.time_terms = dit.embed_time(torch.tensor([TIMESTEP], device=device))

    @property
    def device(self) -> torch.device:
        return self.dit.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.dtype

    @property
    def latent_channels(self) -> int:
        return self.dit.cfg.in_dim

    def open_stream(self, settings: StreamSettings | None = None) -> "FlashVSRStream":
        return FlashVSRStream(self, settings or StreamSettings())


class FlashVSRStream:
    """One video: chunk 0 takes 25 LQ frames and makes 6 latent frames, every later chunk 8 -> 2."""

    def __init__(self, model: FlashVSRModel, settings: StreamSettings):
        self.model, self.settings = model, settings
        self.lq = model.lq_proj.open_stream(settings.lq_mode)
        self.windows = WindowKVCache(len(model.dit.blocks), settings.kv_len)
        self.calls = 0

    def reset(self) -> None:
        self.lq.reset()
        self.windows.reset()
        self.calls = 0

    def lq_frames_wanted(self) -> int:
        return FIRST_CALL_LQ_FRAMES if self.calls == 0 else CALL_LQ_FRAMES

    def latent_frames_next(self) -> int:
        return FIRST_CALL_FRAMES if self.calls == 0 else CALL_FRAMES

    def state_tensors(self) -> dict:
        """Everything the next chunk depends on: the chunk counter, the window cache, the LQ conv caches."""
        out: dict = {"calls": self.calls, "lq_calls": self.lq.calls}
        for i, (k, v) in enumerate(zip(self.windows.k, self.windows.v)):
            if k is not None:
                out[f"k.{i}"], out[f"v.{i}"] = k, v
        for name in ("cache1", "cache2"):
            if getattr(self.lq, name) is not None:
                out[f"lq.{name}"] = getattr(self.lq, name)
        return out

    def load_state_tensors(self, values: dict) -> None:
        layers = len(self.windows.k)
        unknown = [k for k in values if k not in ("calls", "lq_calls", "lq.cache1", "lq.cache2")
                   and not (k[:2] in ("k.", "v.") and k[2:].isdigit() and int(k[2:]) < layers)]
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)} (a snapshot of another model?)")
        dev, dt = self.model.device, self.model.dtype
        self.calls, self.lq.calls = int(values.get("calls", 0)), int(values.get("lq_calls", 0))
        self.windows.k = [values[f"k.{i}"].to(dev, dt) if f"k.{i}" in values else None for i in range(layers)]
        self.windows.v = [values[f"v.{i}"].to(dev, dt) if f"v.{i}" in values else None for i in range(layers)]
        for name in ("cache1", "cache2"):
            t = values.get(f"lq.{name}")
            setattr(self.lq, name, None if t is None else t.to(dev, self.model.lq_proj.conv1.weight.dtype))

    @torch.no_grad()
    def flow(self, x: torch.Tensor, lq_latents: list[torch.Tensor] | None, masks: list | None = None) -> torch.Tensor:
        """One DiT call on the next chunk's latents x [B, C, f, H, W] (f = 6 first, then 2) with its LQ tokens;
        returns the flow prediction [B, C, f, H, W] float32 and advances the stream."""
        want = self.latent_frames_next()
        if x.shape[2] != want:
            raise ValueError(f"FlashVSR call {self.calls} takes {want} latent frames, got {x.shape[2]}")
        m, s = self.model, self.settings
        ratio = s.ratio_for(x.shape[3] * PIXELS_PER_LATENT, x.shape[4] * PIXELS_PER_LATENT)
        out = m.dit.chunk(x, m.cross, m.time_terms, call_frame_start(self.calls), self.windows, lq_latents,
                          attention_mode=s.attention, kernel=s.kernel, local_range=s.local_range, topk_ratio=ratio,
                          masks=masks)
        self.calls += 1
        return out

    @torch.no_grad()
    def step(self, noise: torch.Tensor, lq_frames: torch.Tensor) -> torch.Tensor:
        """noise [B, C, f, H/8, W/8], lq_frames [B, 3, T, H, W] in [-1, 1] (T = 25 first, then 8) -> the chunk's
        clean latents x0 = noise - flow [B, C, f, H/8, W/8] float32."""
        want = self.lq_frames_wanted()
        if lq_frames.shape[2] != want:
            raise ValueError(f"FlashVSR chunk {self.calls} takes {want} LQ frames, got {lq_frames.shape[2]}")
        lq = self.lq.project(lq_frames.to(self.model.device))
        return noise.float() - self.flow(noise, lq)
