"""The Wan DiT behind the causal-model contract (nodes/common/causal.py), replayed as CUDA graphs.

``WanDenoiser`` is what a ``wan.dit`` node hands on: the loaded module plus its config, and the
contract (``open_stream``) that ``ar.sampler`` drives. A session's ``WanCausalStream`` owns this
rank's share of the self-attention KV cache and a ``CausalDenoiser``, the graph wrapper.

``CausalDenoiser``: a call's only Python-level variation is the attended length (and, in
'relative' mode, which sink rows it writes): that is the graph key. Everything else goes in as
copied-in tensors, by name: the block latents, its timesteps, its RoPE rows, its cache row index.
So the cache filling takes one graph per attended length and, once the window is full, one graph
replays for every later block. The prompt's cross-attention K/V live in static buffers:
``set_prompt`` copies a new prompt into them (no re-capture).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.capture import GraphCache, StaticTensors
from nodes.common.causal import CausalModel, CausalStream, StreamSpec, copy_state_into
from nodes.common.kv_cache import DeviceRows, SelfKVCache
from nodes.common.session_rows import SessionPart, SessionRows
from nodes.common.sharding import for_group as context_parallel_for
from nodes.common.sharding import make_rank_cache

from .config import WanConfig
from .dit import CrossCache, WanDiT

# 'full': the context pass runs one more forward on the clean block (upstream). 'reuse': it runs nothing,
# and the block's cache rows keep the K/V of its last denoising step (computed from the last step's noisy
# input at its timestep): one forward of five fewer per block, at a quality cost that benchmarks/
# device_fp8.sh measures. FlashDreams' skip_finalize_kv_cache is the same shortcut.
CONTEXT_PASSES = ("full", "reuse")


class CausalDenoiser:
    """``denoise(x, t, frame_start) -> flow`` over one KV cache and one prompt (tensor timesteps,
    the form ``ARRollout`` and the parity tests call), as CUDA graphs on CUDA, eager elsewhere
    or with ``graphs=False``."""

    def __init__(self, model: WanDiT, cache: SelfKVCache, cross: CrossCache | None = None, *,
                 graphs: bool = True, warmup: int = 1):
        self.model, self.cache = model, cache
        self.static = StaticTensors()
        self.cross: CrossCache | None = None
        self.graphs = GraphCache(self._core, cache.k.device, enabled=graphs, warmup=warmup, name="dit")
        self._plan = None
        if cross is not None:
            self.set_prompt(cross)

    def set_prompt(self, cross: CrossCache) -> None:
        """Copy a prompt's cross-attention K/V into the static buffers the graphs read."""
        moved, lists = False, {}
        for kind in ("k", "v", "k_img", "v_img"):
            src = getattr(cross, kind)
            if src is None:
                lists[kind] = None
                continue
            for i, t in enumerate(src):
                moved |= self.static.put(f"{kind}{i}", t)
            lists[kind] = [self.static[f"{kind}{i}"] for i in range(len(src))]
        if moved:
            self.graphs.clear()
        self.cross = CrossCache(**lists)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, frame_start: int, y: torch.Tensor | None = None,
                 camera: torch.Tensor | None = None):
        """x [B, f, C, H, W], t [B, f] (or [B]) -> flow [B, f, out_dim, H, W] float32. camera: the
        block's LingBot Plücker tensor [B, 384, f, H, W] (models with camera layers)."""
        if self.cross is None:
            raise RuntimeError("CausalDenoiser needs set_prompt() before the first call")
        m, cache = self.model, self.cache
        pt, ph, pw = m.cfg.patch_size
        f, h, w = x.shape[1] // pt, x.shape[3] // ph, x.shape[4] // pw
        cp = context_parallel_for(m.parallel)  # a rank's cache holds its slice of each frame's tokens
        plan = m.causal_plan(cache, frame_start, f, h * w if cp is None else cp.cache_frame_tokens(h * w))
        rows = cache.device_rows(plan)
        cos, sin = m.rope_table.get(frame_start, f, h, w, x.device)
        self._plan = plan  # read by _core while warming up / capturing; replays never call it
        extra = {} if camera is None else {"camera": camera}
        return self.graphs(self._key(plan, x, t, y, camera), x=x, t=t, cos=cos, sin=sin, y=y, index=rows.index,
                           shift_cos=rows.shift_cos, shift_sin=rows.shift_sin, **extra)

    def _key(self, plan, x, t, y, camera=None) -> tuple:
        return (tuple(x.shape), tuple(t.shape), y is not None, plan.attend_rows, self.cache.sink_writes(plan),
                self.cache.k.data_ptr()) + (() if camera is None else (tuple(camera.shape),))

    @torch.no_grad()
    def prepare(self, x: torch.Tensor, first_frame: int = 0, y: torch.Tensor | None = None,
                camera: torch.Tensor | None = None) -> int:
        """Capture, before block 0, every graph a rollout of blocks shaped like ``x`` will need
        (one per attended length while the window fills, then the steady one), so that no block
        pays a warmup or a capture. The dry calls write junk K/V rows, which every real block
        rewrites before it attends to them; the cache is zeroed afterwards anyway. Returns the
        number of graphs; 0 when graphs are off."""
        if not self.graphs.enabled:
            return 0
        cache, pt = self.cache, self.model.cfg.patch_size[0]
        f = x.shape[1] // pt
        t = torch.zeros(x.shape[:2], dtype=torch.float32, device=x.device)
        keys, frame = set(), first_frame
        while True:
            try:
                plan = cache.plan(frame, f)
            except ValueError:  # a bounded cache is full: nothing further to capture
                break
            key = self._key(plan, x, t, y, camera)
            if key in keys:
                break
            keys.add(key)
            for _ in range(self.graphs.warmup + 1):
                self(x, t, frame, y, camera)
            frame += f
        clear_cache(cache)
        return len(keys)

    def _core(self, *, x, t, cos, sin, index, y=None, shift_cos=None, shift_sin=None, camera=None):
        if y is not None:
            x = torch.cat([x, y], dim=2)
        out = self.model._run(x.transpose(1, 2), t, self.cross, self._plan.frame_start, self.cache,
                              rope=(cos, sin), plan=self._plan, rows=DeviceRows(index, shift_cos, shift_sin),
                              camera=camera)
        return out.transpose(1, 2)

    def graph_status(self) -> str:
        return self.graphs.status()


def clear_cache(cache: SelfKVCache) -> None:
    for buf in cache.buffers().values():
        buf.zero_()


@dataclass
class WanDenoiser(CausalModel):
    """What flows on a wan.dit edge: the module, what a bidirectional sampler needs to drive it, and the
    causal-model contract (conditions: ``text`` embeddings [B, L, text_dim]; ``image`` CLIP tokens for I2V
    weights; per block ``y``, channels concatenated to the latents)."""
    module: Any              # WanDiT, eval mode, no grad
    config: WanConfig
    dtype_: torch.dtype
    backend: str
    kv_dtype: torch.dtype | None = None   # the self-attention cache's dtype (None: dtype_; float8_e4m3fn: FP8)
    context_pass: str = "full"           # CONTEXT_PASSES: 'reuse' skips the commit forward
    kv_scaling: str = "row"              # an FP8 cache's scales (kv_cache.FP8_SCALINGS): 'tensor' feeds FP8 attention

    session_conditions = ("text", "image")

    @property
    def block_conditions(self) -> tuple[str, ...]:
        """``y``; with LingBot camera layers (control_type 'cam') also ``camera`` (the Plücker tensor)."""
        return ("y", "camera") if self.config.control_type == "cam" else ("y",)

    @property
    def device(self) -> torch.device:
        return self.module.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_

    def patch_grid(self) -> tuple[int, int]:
        return tuple(self.config.patch_size[1:])

    def open_stream(self, spec: StreamSpec) -> "WanCausalStream":
        return WanCausalStream(self, spec)

    def run_together(self, streams, calls) -> list:
        """Several sessions' calls as one forward (nodes/common/session_rows.py): tokens batched through every
        projection and MLP, self-attention per session against its own cache at its own position. Falls back
        to one by one where a batch cannot be formed (one call, context parallelism, mixed block shapes)."""
        if not self._batchable(streams, calls):
            return super().run_together(streams, calls)
        m = self.module
        parts, start, xs, ts, ropes, ys, cams = [], 0, [], [], [], [], []
        _, f, _, hh, ww = calls[0].x.shape
        h, w = hh // m.cfg.patch_size[1], ww // m.cfg.patch_size[2]
        for s, c in zip(streams, calls):
            n = c.x.shape[0]
            plan = m.causal_plan(s.cache, c.frame_start, f, h * w)
            parts.append(SessionPart(start, n, s.cache, plan, s.cache.device_rows(plan)))
            start += n
            xs.append(c.x)
            ts.append(s._timestep(c.t, c.x))
            cos, sin = m.rope_table.get(c.frame_start, f, h, w, c.x.device)
            ropes.append((cos.expand(n, *cos.shape), sin.expand(n, *sin.shape)))
            ys.append(c.conditions.get("y"))
            cams.append(c.conditions.get("camera"))
        x = torch.cat(xs)
        if ys[0] is not None:
            x = torch.cat([x, torch.cat(ys)], dim=2)
        rope = (torch.cat([r[0] for r in ropes]), torch.cat([r[1] for r in ropes]))
        camera = torch.cat(cams) if cams[0] is not None else None
        with torch.no_grad():
            out = m._run(x.transpose(1, 2), torch.cat(ts), self._stacked_cross(streams), rope=rope, camera=camera,
                         sessions=SessionRows(parts)).transpose(1, 2)
        return [None if c.is_commit else o for c, o in zip(calls, SessionRows(parts).split(out))]

    def _batchable(self, streams, calls) -> bool:
        if len(calls) < 2 or context_parallel_for(self.module.parallel) is not None:
            return False
        if not all(isinstance(s, WanCausalStream) and s.model is self and s.denoiser.cross is not None
                   for s in streams):
            return False
        shapes = {(tuple(c.x.shape[1:]), c.is_commit, tuple(sorted(k for k, v in c.conditions.items() if v is not None)))
                  for c in calls}
        return len(shapes) == 1 and set(next(iter(shapes))[2]) <= {"y", "camera"}

    def _stacked_cross(self, streams) -> CrossCache:
        """The sessions' prompt K/V stacked on the batch (kept while the same prompts are batched together)."""
        crosses = tuple(s.denoiser.cross for s in streams)
        memo = getattr(self, "_cross_memo", None)
        if memo is not None and len(memo[0]) == len(crosses) and all(a is b for a, b in zip(memo[0], crosses)):
            return memo[1]
        lists = {}
        for kind in ("k", "v", "k_img", "v_img"):
            first = getattr(crosses[0], kind)
            lists[kind] = None if first is None else [torch.cat([getattr(c, kind)[i] for c in crosses])
                                                      for i in range(len(first))]
        stacked = CrossCache(**lists)
        self._cross_memo = (crosses, stacked)
        return stacked


class WanCausalStream(CausalStream):
    """One session of the causal Wan DiT: this rank's KV cache, the prompt's K/V, the captured graphs."""

    def __init__(self, model: WanDenoiser, spec: StreamSpec):
        if model.config.patch_size[0] != 1:
            raise ValueError("causal mode needs temporal patch size 1")
        cfg, (_, h, w), (ph, pw) = model.config, spec.frame_shape, model.patch_grid()
        self.model, self.spec = model, spec
        self.cache = make_rank_cache(
            cfg, model.module.parallel, (h // ph) * (w // pw),
            sink_frames=spec.sink_frames, window_frames=spec.window_frames, max_frames=spec.max_frames,
            batch_size=spec.batch, rope_mode=spec.rope_mode, dtype=model.kv_dtype or model.dtype,
            read_dtype=model.dtype, device=model.device, fp8_scaling=model.kv_scaling)
        kern = model.module.kernels   # an FP8 cache quantises on write and dequantises on read with the DiT's
        self.cache.quant, self.cache.dequant = kern.quant_rows, kern.dequant   # (compiled) kernels
        self.cache.quant_running = kern.quant_running
        self.denoiser = CausalDenoiser(model.module, self.cache, graphs=spec.graphs)
        self._t: dict[tuple, torch.Tensor] = {}
        self._denoised: tuple | None = None

    def set_conditions(self, text: torch.Tensor, image: torch.Tensor | None = None) -> None:
        self.set_cross(self.cross_for(text, image))

    def cross_for(self, text: torch.Tensor, image: torch.Tensor | None = None) -> CrossCache:
        """This model's cross-attention K/V of a prompt (and I2V image tokens)."""
        dev = self.model.device
        text = text.to(dev)
        if text.shape[0] != self.spec.batch:
            text = text.expand(self.spec.batch, -1, -1)
        with torch.no_grad():
            return self.model.module.prepare_cross(text, None if image is None else image.to(dev))

    def set_cross(self, cross: CrossCache) -> None:
        """Attend to ``cross`` (this model's or another's of the same shapes: Wan 2.2's shared text cache)."""
        self.denoiser.set_prompt(cross)

    def _timestep(self, t: float, x: torch.Tensor) -> torch.Tensor:
        key = (t, tuple(x.shape[:2]))
        if key not in self._t:
            self._t[key] = torch.full(x.shape[:2], t, dtype=torch.float32, device=x.device)
        return self._t[key]

    def denoise(self, x, t, frame_start, y=None, camera=None):
        self._denoised = (frame_start, tuple(x.shape))   # what 'reuse' may keep (see commit)
        with torch.no_grad():
            return self.denoiser(x, self._timestep(t, x), frame_start, y, camera)

    def commit(self, x, t, frame_start, **block) -> None:
        """The context pass. With ``context_pass: reuse`` nothing runs when the call before it denoised this very
        block (its rows hold that step's K/V); an image prefix or a recache commit still runs its forward. The
        forward goes through ``denoise`` so a subclass's block conditions (the world model's ``action``) apply."""
        last = self._denoised
        if not (self.model.context_pass == "reuse" and last == (frame_start, tuple(x.shape))):
            self.denoise(x, t, frame_start, **block)
        self._denoised = None

    def prepare(self, x, first_frame: int = 0, y=None, camera=None) -> int:
        return self.denoiser.prepare(x, first_frame, y, camera)

    def reset(self) -> None:
        self._denoised = None
        clear_cache(self.cache)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's self-attention cache (FP8: with its scales); the cross-attention K/V follow from the prompt."""
        return self.cache.buffers()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        copy_state_into(self.cache.buffers(), tensors, "KV cache")

    def graph_status(self) -> str:
        return self.denoiser.graph_status()
