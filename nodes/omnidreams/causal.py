"""OmniDreams behind the causal-model contract (nodes/common/causal.py).

- session conditions: ``text`` [B, L, C_text] (required) and ``image`` [B, 1, C, H, W], the first-frame
  latent (optional: without it nothing is stamped);
- block condition: ``hdmap`` [B, f, C_hd, H, W], the HD-map latent of the block's frames (required);
- cache: a [window] self-attention KV cache without sink (upstream: the window includes the current chunk,
  the oldest chunk leaves when full; absolute RoPE positions, keys rotated before caching).
- classifier-free guidance (the diffusion-forcing teacher, ``guidance`` != 1): a second, unconditional
  branch with the negative prompt and its OWN self-attention KV cache (FlashDreams
  ``network_cache_uncond``); every call, the context pass included, runs both branches and returns
  ``uncond + guidance * (cond - uncond)``, so both caches hold their branch's history.
- chunk 0 (``frame_start`` 0): the network input has its first latent frame replaced by the image latent
  and a condition mask of ones on it (zeros elsewhere and on every later chunk). The flow returned for that
  frame is the one that maps x to the image (sigma = t / 1000, the flow-matching parameterisation), so the
  sampler's x0 = x - sigma * flow keeps the stamped frame, as upstream's postprocess does.
"""
from __future__ import annotations

import torch

from nodes.common.causal import CausalModel, CausalStream, StreamSpec, copy_state_into
from nodes.common.kv_cache import SelfKVCache

from .model import OmniDreamsNet


class OmniDreamsCausal(CausalModel):
    session_conditions = ("text", "image")
    block_conditions = ("hdmap",)
    required_conditions = ("text",)

    def __init__(self, net: OmniDreamsNet, image: torch.Tensor | None = None, views: list[int] | None = None,
                 guidance: float = 1.0, negative_text: torch.Tensor | None = None):
        """``image``: a first-frame latent [B, 1, C, H, W] used when the session sets no ``image`` condition.
        ``views``: the camera indices of a multi-view network's views; its samples are then B*V, in (b, v)
        order, on every tensor (latents, text, image, HD-map), and each view has its own cache rows.
        ``guidance`` != 1: classifier-free guidance against ``negative_text`` [1 or B, L, C_text]."""
        if guidance != 1.0 and negative_text is None:
            raise ValueError(f"guidance {guidance} needs negative prompt embeddings (wire negative_text)")
        if bool(net.camera_embeddings) != bool(views):
            raise ValueError("a multi-view checkpoint needs its views' camera indices" if net.camera_embeddings else
                             f"the checkpoint is single-view, but {len(views)} views were given")
        if views and not all(0 <= v < net.camera_embeddings for v in views):
            raise ValueError(f"camera indices {views} outside the checkpoint's {net.camera_embeddings} cameras")
        self.net = net
        self.image = image
        self.views = list(views or [])
        self.guidance = float(guidance)
        self.negative_text = negative_text if self.guidance != 1.0 else None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def patch_grid(self) -> tuple[int, int]:
        k = self.net.cfg.patch_spatial
        return k, k

    def open_stream(self, spec: StreamSpec) -> "OmniDreamsStream":
        return OmniDreamsStream(self, spec)


class OmniDreamsStream(CausalStream):
    def __init__(self, model: OmniDreamsCausal, spec: StreamSpec):
        cfg = model.net.cfg
        C, H, W = spec.frame_shape
        k, kt = cfg.patch_spatial, cfg.patch_temporal
        if C != cfg.in_channels:
            raise ValueError(f"latent has {C} channels, the OmniDreams checkpoint {cfg.in_channels}")
        if H % k or W % k:
            raise ValueError(f"latent {H}x{W} is not divisible by the patch {k}x{k}")
        if spec.frames_per_block % kt:
            raise ValueError(f"frames_per_block {spec.frames_per_block} is not a multiple of patch_temporal {kt}")
        if spec.sink_frames:
            raise ValueError("OmniDreams keeps no sink frames (sink_frames must be 0)")
        if spec.rope_mode != "absolute":
            raise ValueError("OmniDreams rotates keys at absolute positions (rope_mode: absolute)")
        if model.views and spec.batch % len(model.views):
            raise ValueError(f"batch {spec.batch} is not a multiple of the {len(model.views)} views (samples are B*V)")
        self.model, self.spec = model, spec
        self.views = torch.tensor(model.views, dtype=torch.long, device=model.device) if model.views else None
        self.kt = kt
        def new_cache() -> SelfKVCache:
            return SelfKVCache(
                cfg.num_blocks, cfg.num_heads, cfg.head_dim, (H // k) * (W // k), sink_frames=0,
                window_frames=None if spec.window_frames is None else spec.window_frames // kt,
                max_frames=None if spec.max_frames is None else -(-spec.max_frames // kt), batch_size=spec.batch,
                dtype=model.dtype, device=model.device)
        self.cache = new_cache()
        self.uncond_cache = new_cache() if model.negative_text is not None else None
        self.cross = None
        self.cross_uncond = None
        self.image = None

    # ------------------------------------------------------------------ conditions
    def set_conditions(self, text: torch.Tensor, image: torch.Tensor | None = None) -> None:
        net = self.model.net
        if text.ndim != 3 or text.shape[-1] != net.cfg.crossattn_proj_in_channels:
            raise ValueError(f"text embeddings {list(text.shape)}: expected [B, L, {net.cfg.crossattn_proj_in_channels}]")
        N = self.spec.batch
        if text.shape[0] not in (1, N):
            raise ValueError(f"text embeddings for {text.shape[0]} samples, the session has {N}"
                             + (f" ({N // len(self.model.views)} x {len(self.model.views)} views)" if self.model.views
                                else ""))
        with torch.no_grad():
            self.cross = net.prepare_cross(text.to(self.model.device).expand(N, -1, -1))
            if self.uncond_cache is not None:
                neg = self.model.negative_text
                if neg.ndim != 3 or neg.shape[-1] != text.shape[-1] or neg.shape[0] not in (1, N):
                    raise ValueError(f"negative prompt embeddings {list(neg.shape)}: expected [1 or {N}, L, "
                                     f"{text.shape[-1]}]")
                self.cross_uncond = net.prepare_cross(neg.to(self.model.device).expand(N, -1, -1))
        if image is None:
            image = self.model.image
        if image is not None:
            C, H, W = self.spec.frame_shape
            if image.ndim != 5 or tuple(image.shape[2:]) != (C, H, W):
                raise ValueError(f"first-frame latent {list(image.shape)}: expected [B, F, {C}, {H}, {W}]")
            image = image.to(self.model.device, torch.float32)
        self.image = image

    def _hdmap(self, hdmap: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        want = self.model.net.hdmap_channels
        B, f, _, H, W = x.shape
        if hdmap is None:
            raise ValueError("OmniDreams needs the `hdmap` block condition (the HD-map latent of every block)")
        if hdmap.ndim != 5 or hdmap.shape[1] != f or tuple(hdmap.shape[2:]) != (want, H, W) or \
                hdmap.shape[0] not in (1, B):
            raise ValueError(f"hdmap block {list(hdmap.shape)}: expected [{B}, {f}, {want}, {H}, {W}] "
                             f"({f} frames per block, {want} HD-map channels from the checkpoint, the latent size)")
        return hdmap.to(x.device).expand(B, -1, -1, -1, -1)

    # ------------------------------------------------------------------ calls
    def network_flow(self, x: torch.Tensor, t: float, frame_start: int, hdmap) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The network's flow [B, f, C, H, W] for block x (first frame stamped at chunk 0), the input it saw, and
        how many leading frames were stamped; writes the block's cache rows."""
        if self.cross is None:
            raise RuntimeError("set_conditions(text=...) first")
        B, f = x.shape[:2]
        hd = self._hdmap(hdmap, x)
        xin, mask, n = x.float(), torch.zeros_like(x[:, :, :1], dtype=torch.float32), 0
        if frame_start == 0 and self.image is not None:
            n = min(self.image.shape[1], f)
            xin = xin.clone()
            xin[:, :n] = self.image[:, :n].expand(B, -1, -1, -1, -1)
            mask[:, :n] = 1.0
        plan = self.cache.plan(frame_start // self.kt, f // self.kt)
        tt = torch.full((B,), float(t), dtype=torch.float32, device=x.device)
        net = self.model.net

        def branch(cross, cache) -> torch.Tensor:
            return net.forward_chunk(xin.transpose(1, 2), tt, hd.transpose(1, 2), cross,
                                     condition_mask=mask.transpose(1, 2), cache=cache, plan=plan,
                                     views=self.views).transpose(1, 2).float()
        flow = branch(self.cross, self.cache)
        if self.uncond_cache is not None:
            uncond = branch(self.cross_uncond, self.uncond_cache)
            flow = uncond + self.model.guidance * (flow - uncond)
        return flow, xin, n

    def _run(self, x: torch.Tensor, t: float, frame_start: int, hdmap) -> torch.Tensor:
        flow, xin, n = self.network_flow(x, t, frame_start, hdmap)
        if n and t > 0:
            flow[:, :n] = (x[:, :n].float() - xin[:, :n]) / (float(t) / 1000.0)
        return flow

    def denoise(self, x, t, frame_start, hdmap=None) -> torch.Tensor:
        return self._run(x, t, frame_start, hdmap)

    def commit(self, x, t, frame_start, hdmap=None) -> None:
        self._run(x, t, frame_start, hdmap)

    def reset(self) -> None:
        for t in self.state_tensors().values():
            t.zero_()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"k": self.cache.k, "v": self.cache.v}
        if self.uncond_cache is not None:
            out.update(uncond_k=self.uncond_cache.k, uncond_v=self.uncond_cache.v)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        copy_state_into(self.state_tensors(), tensors, "omnidreams cache")
