"""`ar.sampler`: one autoregressive block of a causal Wan DiT per engine block (Self-Forcing / Causal-Forcing).

Per session the node owns the self-attention KV cache, the prompt's cross-attention
K/V, the block rollout (``nodes.ar.ARRollout``) and the RNG. A prompt switch rebuilds
only the cross-attention K/V: the frames already generated stay in the self-attention
cache, so the video continues under the new prompt.

Noise: with a global cache (``window_frames: null``) the rollout length is known, so the
noise of all ``num_blocks`` blocks is drawn first from a generator seeded with the seed
and the re-noise draws continue that stream - upstream's RNG order. With a window
(unbounded rollouts) each block's noise is drawn from the same generator just before
the block, so memory does not grow with the number of blocks.

Timing: every denoiser call is timed (CUDA events on GPU, perf counters on CPU) and
sorted by kind, so ``last_breakdown_ms()`` gives the last block's DiT time (all
denoising steps) apart from the KV (context) pass - what ``fd bench`` reports.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.errors import FdError
from engine.node import Node, Param, Port
from engine.timing import NodeTimer
from engine.types import DENOISER, INT, LATENT, TEXT_EMBEDDING

from .rollout import ARRollout, CallTrace
from .schedule import ARSchedule

KIND_KEYS = {"denoise": "dit_ms", "context": "kv_ms", "image": "image_ms"}


@dataclass
class ARState:
    """One session's rollout: caches, RNG, and the timers of the last block."""
    handle: Any = None
    cache: Any = None                 # nodes.wan.kv_cache.SelfKVCache
    denoiser: Any = None              # CausalDenoiser (CUDA graphs on CUDA); holds the prompt's K/V
    rollout: ARRollout | None = None
    generator: torch.Generator | None = None
    noise: torch.Tensor | None = None  # all blocks' noise (global cache only)
    prompt_switches: int = 0
    key: tuple | None = None           # what the cache and graphs were built for (reused across sessions)
    pending: NodeTimer | None = None
    timers: dict[str, list[NodeTimer]] = field(default_factory=dict)


class ARSamplerNode(Node):
    type_name = "ar.sampler"
    doc = ("Autoregressive few-step sampler of Self-Forcing / Causal-Forcing on a causal Wan DiT: per block, "
           "warped FlowMatch denoising steps then a KV (context) pass. Owns the KV cache; a prompt switch keeps it.")
    inputs = (
        Port("model", DENOISER, "a causal-capable Wan DiT (wan.dit)"),
        Port("text", TEXT_EMBEDDING, "prompt embeddings [B, L, text_dim]; a new value switches the prompt"),
        Port("image_latent", LATENT, "I2V: image latent frames [B, F, C, h, w] written to the cache first "
             "(Causal-Forcing initial_latent)", optional=True),
        Port("seed", INT, "noise seed (else the seed param)", optional=True),
    )
    outputs = (Port("latent", LATENT, "clean latents of this block [B, frames_per_block, C, h, w] (I2V block 0: "
                    "the image frames first)"),)
    params = (
        Param("steps", list, [1000, 750, 500, 250], "denoising step list (1000 = pure noise)"),
        Param("first_chunk_steps", list, None, "step list of the first generated block (Causal-Forcing++)",
              nullable=True),
        Param("warp", bool, True, "map steps through the shifted FlowMatch table (warp_denoising_step)"),
        Param("shift", float, 5.0, "FlowMatch timestep shift", min=0.0),
        Param("frames_per_block", int, 3, "latent frames per block (3 chunkwise, 1 framewise)", min=1),
        Param("latent_channels", int, 16, "latent channels", min=1),
        Param("latent_height", int, 60, "latent height (pixel height / 8)", min=1),
        Param("latent_width", int, 104, "latent width (pixel width / 8)", min=1),
        Param("num_blocks", int, 7, "blocks the global KV cache is sized for (window_frames: null)", min=1),
        Param("sink_frames", int, 0, "frames kept forever at the start of the cache (attention sink)", min=0),
        Param("window_frames", int, None, "frames the cache keeps, sink included (null: every frame of "
              "num_blocks, upstream's default); set it for unbounded rollouts", min=1, nullable=True),
        Param("rope_mode", str, "absolute", "RoPE of evicted windows: absolute (upstream) or relative",
              choices=("absolute", "relative")),
        Param("context_noise", float, 0.0, "timestep of the KV pass (0 = clean, upstream inference)", min=0.0),
        Param("batch", int, 1, "videos per session", min=1),
        Param("seed", int, 0, "noise seed when the seed input is not wired"),
        Param("graphs", bool, True, "on CUDA, replay the DiT calls as CUDA graphs (one per attended length)"),
    )
    capturable = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last: dict[str, list[NodeTimer]] = {}
        self._graphs = None  # the latest session's denoiser, for graph_status()
        self._spare: tuple | None = None  # (key, cache, denoiser) a finished session left: graphs kept

    def new_state(self) -> ARState:
        return ARState()

    # ------------------------------------------------------------------ setup
    def _schedule(self) -> ARSchedule:
        from nodes.samplers.flow_match import FlowMatchTable
        return ARSchedule.build(FlowMatchTable(self.p.shift), self.p.steps, first_chunk_steps=self.p.first_chunk_steps,
                                warp=self.p.warp, context_noise=self.p.context_noise)

    def _start(self, state: ARState, inputs: dict) -> None:
        from nodes.wan.context_parallel import make_rank_cache

        h = inputs["model"]
        cfg, dev = h.config, h.module.patch_embedding.weight.device
        _, ph, pw = cfg.patch_size
        lh, lw, nfpb = self.p.latent_height, self.p.latent_width, self.p.frames_per_block
        if lh % ph or lw % pw:
            raise FdError(f"node {self.name!r}: latent {lh}x{lw} is not divisible by the DiT patch {ph}x{pw}")
        image = inputs.get("image_latent")
        prefix = 0 if image is None else image.shape[1]
        if image is not None and prefix % nfpb:
            raise FdError(f"node {self.name!r}: image_latent has {prefix} frames, not a multiple of "
                          f"frames_per_block={nfpb}")
        if self.p.window_frames is not None and self.p.window_frames - self.p.sink_frames < nfpb:
            raise FdError(f"node {self.name!r}: window_frames - sink_frames must hold a block of {nfpb} frames "
                          "(upstream fails there too)")
        group = getattr(h.module, "parallel", None)
        on_cuda = str(dev).startswith("cuda")
        graphs = bool(self.p.graphs and on_cuda and getattr(self, "capture_graphs", on_cuda))
        key = (id(h.module), lh, lw, prefix, self.p.num_blocks, self.p.sink_frames, self.p.window_frames,
               self.p.batch, self.p.rope_mode, graphs)
        spare, self._spare = self._spare, None
        if spare is not None and spare[0] == key:
            state.cache, state.denoiser = spare[1], spare[2]   # a previous session's cache and captured graphs
            state.cache.k.zero_()
            state.cache.v.zero_()
        else:
            try:
                state.cache = make_rank_cache(
                    cfg, group, (lh // ph) * (lw // pw), sink_frames=self.p.sink_frames,
                    window_frames=self.p.window_frames, max_frames=prefix + self.p.num_blocks * nfpb,
                    batch_size=self.p.batch, rope_mode=self.p.rope_mode, dtype=h.dtype, device=dev)
            except ValueError as e:
                raise FdError(f"node {self.name!r}: {e}") from e
        state.key = key
        seed = int(inputs.get("seed", self.p.seed))
        state.generator = torch.Generator(device=dev).manual_seed(seed)
        if self.p.window_frames is None:
            state.noise = torch.randn(self._noise_shape(self.p.num_blocks * nfpb), generator=state.generator,
                                      device=dev)
        state.handle = h
        cross = self._cross(h, inputs["text"])
        if state.denoiser is not None:
            state.denoiser.set_prompt(cross)                    # copies into the captured static buffers
        else:  # context-parallel too: the DiT shards tokens itself; NCCL collectives are captured with it
            from nodes.wan.dit import CausalDenoiser
            state.denoiser = CausalDenoiser(h.module, state.cache, cross, graphs=graphs)
            if graphs:  # capture every attended-length graph now, so no block pays a capture
                with torch.no_grad():
                    state.denoiser.prepare(torch.zeros(self._noise_shape(nfpb), device=dev))
        self._graphs = state.denoiser
        init = None if image is None else image.to(dev, torch.float32).expand(self.p.batch, -1, -1, -1, -1)
        state.rollout = ARRollout(self._timed(state), self._schedule(), nfpb, initial_latent=init,
                                  generator=state.generator, trace=lambda tr: self._classify(state, tr))

    def _noise_shape(self, frames: int) -> tuple[int, ...]:
        return (self.p.batch, frames, self.p.latent_channels, self.p.latent_height, self.p.latent_width)

    def _cross(self, h, text: torch.Tensor):
        text = text.to(h.module.patch_embedding.weight.device)
        if text.shape[0] != self.p.batch:
            text = text.expand(self.p.batch, -1, -1)
        with torch.no_grad():
            return h.module.prepare_cross(text)

    def _timed(self, state: ARState):
        device = str(state.cache.k.device)

        def denoise(x, t, frame_start):
            timer = NodeTimer(device)
            timer.start()
            with torch.no_grad():
                flow = state.denoiser(x, t, frame_start)
            timer.stop()
            state.pending = timer
            return flow
        return denoise

    def _classify(self, state: ARState, tr: CallTrace) -> None:
        state.timers.setdefault(KIND_KEYS[tr.kind], []).append(state.pending)
        state.pending = None

    # ------------------------------------------------------------------ running
    def run(self, inputs, state: ARState, step):
        changed = step.extra.get("changed", set())
        if state.rollout is None:
            self._start(state, inputs)
        elif "text" in changed:
            state.denoiser.set_prompt(self._cross(state.handle, inputs["text"]))
            state.prompt_switches += 1
        roll, nfpb = state.rollout, self.p.frames_per_block
        b = roll.block_index
        if state.noise is not None:
            if b >= self.p.num_blocks:
                raise FdError(f"node {self.name!r}: block {b} is past num_blocks={self.p.num_blocks}, which sizes "
                              "the global KV cache; raise num_blocks, or set window_frames for an unbounded rollout")
            noise = state.noise[:, b * nfpb:(b + 1) * nfpb]
        else:
            noise = torch.randn(self._noise_shape(nfpb), generator=state.generator, device=state.cache.k.device)
        state.timers = {}
        x0 = roll.step(noise)
        self._last = state.timers
        if b == 0 and roll.initial_latent is not None:
            x0 = torch.cat([roll.initial_latent.to(x0.dtype), x0], dim=1)
        return {"latent": x0}

    def release(self, state: ARState) -> None:
        """Keep the finished session's cache and captured graphs for the next session of the same shape."""
        if state.denoiser is not None and getattr(state, "key", None) is not None:
            self._spare = (state.key, state.cache, state.denoiser)
        state.denoiser = state.cache = state.rollout = None

    def last_breakdown_ms(self, state: ARState | None = None) -> dict[str, float]:
        """Milliseconds of the last block by kind: dit_ms (all denoising steps), kv_ms (context pass),
        image_ms (I2V image pass, block 0 only). On CUDA this waits for the block's events."""
        timers = self._last if state is None else state.timers
        return {k: sum(t.ms() for t in ts) for k, ts in timers.items()}

    def graph_status(self) -> str:
        """CUDA-graph use of the latest session's DiT calls (read by ``fd bench``)."""
        status = getattr(self._graphs, "graph_status", None)
        return status() if callable(status) else "eager"


NODE_TYPES = (ARSamplerNode,)
