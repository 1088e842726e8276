"""`ar.sampler`: one autoregressive block of any causal model per engine block (Self-Forcing / Causal-Forcing).

The model comes in on a ``causal_denoiser`` edge and is driven only through the causal-model
contract (nodes/common/causal.py): per session the node opens a stream (the model's KV cache
and graphs), sets its conditions, and runs the block rollout (``nodes.ar.ARRollout``) with
the RNG. A prompt switch sets the conditions again: the frames already generated stay in the
self-attention cache, so the video continues under the new prompt. Wired per-block condition
inputs (camera, action, video, hdmap, y) reach the model by name, each block's value with it.

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

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.errors import FdError
from engine.node import Node, Param, Port
from engine.timing import NodeTimer
from engine.types import CAMERA, CAUSAL_DENOISER, IMAGE_EMBEDDING, INT, LATENT, TENSOR, TEXT_EMBEDDING
from nodes.common.causal import CausalModel, CausalStream, StreamSpec, TimestepExperts

from . import state_io, switch
from .rollout import ARRollout, CallTrace, drive_together
from .schedule import ARSchedule

KIND_KEYS = {"denoise": "dit_ms", "context": "kv_ms", "image": "image_ms"}
# optional input port -> the condition name the model receives it under
SESSION_CONDITIONS = {"text": "text", "image_embedding": "image"}
BLOCK_CONDITIONS = ("camera", "action", "video", "hdmap", "y")


@dataclass
class ARState:
    """One session's rollout: the model's stream (cache, conditions, graphs), RNG, and the timers of the last block."""
    model: Any = None
    stream: Any = None                # a nodes.common.causal.CausalStream
    rollout: ARRollout | None = None
    generator: torch.Generator | None = None
    noise: torch.Tensor | None = None  # all blocks' noise (global cache only)
    prompt_switches: int = 0
    key: tuple | None = None           # what the cache and graphs were built for (reused across sessions)
    pending: NodeTimer | None = None
    timers: dict[str, list[NodeTimer]] = field(default_factory=dict)
    conditions: dict = field(default_factory=dict)  # the session conditions set last (digested by snapshots)
    restore: dict | None = None        # snapshot values, applied when the first block opens the stream
    history: list = field(default_factory=list)   # prompt_switch: recache - the context passes the cache holds


class ARSamplerNode(Node):
    type_name = "ar.sampler"
    doc = ("Autoregressive few-step sampler of Self-Forcing / Causal-Forcing on any causal model: per block, "
           "warped FlowMatch denoising steps then a KV (context) pass. The model's stream owns the KV cache; a prompt "
           "switch keeps it.")
    inputs = (
        Port("model", CAUSAL_DENOISER, "a causal model (wan.dit, or any node whose output implements the "
             "causal-model contract)"),
        Port("text", TEXT_EMBEDDING, "prompt embeddings [B, L, text_dim]; a new value switches the prompt"),
        Port("image_embedding", IMAGE_EMBEDDING, "image tokens for models conditioned on them (session condition "
             "`image`)", optional=True),
        Port("image_latent", LATENT, "I2V: image latent frames [B, F, C, h, w] written to the cache first "
             "(Causal-Forcing initial_latent)", optional=True),
        Port("seed", INT, "noise seed (else the seed param)", optional=True),
        Port("camera", CAMERA, "per-block camera condition, passed to the model by name", optional=True),
        Port("action", TENSOR, "per-block action condition, passed to the model by name", optional=True),
        Port("video", LATENT, "per-block video condition (e.g. low-res frames), passed by name", optional=True),
        Port("hdmap", LATENT, "per-block HD-map condition, passed by name", optional=True),
        Port("y", LATENT, "per-block channels concatenated to the latents [B, f, C_y, h, w] (I2V mask + image "
             "latent, LingBot-World), passed by name", optional=True),
    )
    outputs = (Port("latent", LATENT, "clean latents of this block [B, frames_per_block, C, h, w] (I2V block 0: "
                    "the image frames first)"),)
    params = (
        Param("steps", list, [1000, 750, 500, 250], "denoising step list (1000 = pure noise)"),
        Param("first_chunk_steps", list, None, "step list of the first generated block (Causal-Forcing++)",
              nullable=True),
        Param("warp", bool, True, "map steps through the shifted FlowMatch table (warp_denoising_step)"),
        Param("shift", float, 5.0, "FlowMatch timestep shift", min=0.0),
        Param("table", str, "flow_match", "timestep table the steps and sigmas come from: flow_match (Self-Forcing's "
              "1000-entry table) or unipc (the int64 UniPC set_timesteps(1000, shift) table, LingBot-World)",
              choices=("flow_match", "unipc")),
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
        Param("boundary_ratio", float, None, "two-expert models (Wan 2.2): steps at t/1000 >= this predict x at the "
              "boundary and re-noise with add_noise_high (FastVideo); null: every step predicts x0 (Self-Forcing). "
              "Must equal the experts' boundary", min=0.0, max=1.0, nullable=True),
        Param("unipc_steps", int, None, "diffusion-forcing teacher (OmniDreams): solve every block with the UniPC "
              "multistep ODE over set_timesteps(unipc_steps, shift) from pure noise (no re-noise draws) instead of "
              "the steps list; the context pass re-noises with that schedule's sigma nearest context_noise; null: "
              "the few-step re-noise sampler", min=1, nullable=True),
        Param("first_block_frames", int, None, "latent frames of the first generated block (FastVideo Wan 2.2: 1); "
              "null: frames_per_block", min=1, nullable=True),
        Param("batch", int, 1, "videos per session", min=1),
        Param("seed", int, 0, "noise seed when the seed input is not wired"),
        Param("graphs", bool, True, "on CUDA, replay the DiT calls as CUDA graphs (one per attended length)"),
        Param("prompt_switch", str, "keep", "what a prompt switch does to the cache: keep it (the video flows on), "
              "recache (re-run the context passes of the cached frames with the new prompt, as LongLive), reset "
              "(start over as a new session would)", choices=switch.MODES),
    )
    capturable = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.p.boundary_ratio is not None and not 0.0 < float(self.p.boundary_ratio) < 1.0:
            raise ValueError(f"boundary_ratio must lie strictly between 0 and 1, got {self.p.boundary_ratio}")
        if self.p.boundary_ratio is not None and self.p.unipc_steps is not None:
            raise ValueError("unipc_steps (a UniPC solve per block) and boundary_ratio (two experts) exclude each other")
        self._last: dict[str, list[NodeTimer]] = {}
        self._graphs = None  # the latest session's denoiser, for graph_status()
        self._spare: tuple | None = None  # (key, stream) a finished session left: cache and graphs kept

    def facts(self, sources) -> dict:
        """The KV cache this sampler will allocate, when the wired model node tells its cache layout
        (``cache_layout()``: num_layers, num_heads, head_dim, patch, dtype, dtype_bytes), and, for
        two-expert models, which steps go to which expert."""
        out = {"notes": self._expert_notes()}
        layout = getattr(sources.get("model"), "cache_layout", None)
        if callable(layout):
            from .memory import kv_cache
            out["kv_cache"] = kv_cache(self.p, layout())
        return out

    def _expert_notes(self) -> list[str]:
        """Which steps go to which expert (two-expert models), and the first block's length."""
        if self.p.boundary_ratio is None:
            return []
        sched = self._schedule()
        ts = sched.rest.t
        high = [f"{t:.1f}" for t in ts if sched.boundary.is_high(t)]
        low = [f"{t:.1f}" for t in ts if not sched.boundary.is_high(t)]
        return [f"steps t >= {sched.boundary.t:g} (high-noise expert, x at the boundary): {', '.join(high) or 'none'}",
                f"steps t < {sched.boundary.t:g} (low-noise expert, x0): {', '.join(low) or 'none'}",
                f"context pass t={sched.context_t:g} into every expert's cache; first block "
                f"{self.first_frames} frame(s), then {self.p.frames_per_block}"]

    def preflight(self, upstream) -> None:
        """Before any weight is read: a model node that declares a ``boundary_ratio`` param (wan22.experts)
        must split at the sampler's boundary."""
        src = upstream.get("model")
        theirs = getattr(getattr(src, "p", None), "boundary_ratio", None)
        mine = self.p.boundary_ratio
        if theirs is not None and mine is not None and float(theirs) != float(mine):
            raise FdError(f"node {self.name!r}: boundary_ratio {mine} but its model (node {src.name!r}) splits its "
                          f"experts at {theirs}; set the same value on both")

    def new_state(self) -> ARState:
        return ARState()

    # ------------------------------------------------------------------ setup
    def _schedule(self) -> ARSchedule:
        from nodes.samplers.flow_match import FlowMatchTable
        from nodes.samplers.unipc import UniPCIntTable
        table = UniPCIntTable(self.p.shift) if self.p.table == "unipc" else FlowMatchTable(self.p.shift)
        return ARSchedule.build(table, self.p.steps, first_chunk_steps=self.p.first_chunk_steps,
                                warp=self.p.warp, context_noise=self.p.context_noise,
                                boundary_ratio=self.p.boundary_ratio, unipc_steps=self.p.unipc_steps)

    @property
    def first_frames(self) -> int:
        return self.p.frames_per_block if self.p.first_block_frames is None else self.p.first_block_frames

    def _frames(self, blocks: int) -> int:
        """Generated latent frames of ``blocks`` blocks."""
        return 0 if blocks <= 0 else self.first_frames + (blocks - 1) * self.p.frames_per_block

    def _check_boundary(self, model: CausalModel) -> None:
        """A timestep-split model and the sampler's boundary must name the same timestep."""
        if self.p.boundary_ratio is None or not isinstance(model, TimestepExperts):
            return
        want = self._schedule().boundary.t
        if len(model.experts) != 2 or model.experts[0][0] != want:
            raise FdError(f"node {self.name!r}: boundary_ratio {self.p.boundary_ratio} (t >= {want}) but the model's "
                          f"experts split at {[b for b, _ in model.experts[:-1]]}; set the same boundary on both")

    def _model(self, inputs: dict) -> CausalModel:
        model = inputs["model"]
        if not isinstance(model, CausalModel):
            raise FdError(f"node {self.name!r}: input `model` is a {type(model).__name__}, not a causal model; wire "
                          "the output of a node whose type is causal_denoiser (it implements "
                          "nodes.common.causal.CausalModel)")
        return model

    def _conditions(self, model: CausalModel, inputs: dict) -> tuple[dict, dict]:
        """(session conditions, block conditions) from the wired inputs, refusing any the model does not take."""
        session = {name: inputs[port] for port, name in SESSION_CONDITIONS.items() if port in inputs}
        block = {name: inputs[name] for name in BLOCK_CONDITIONS if name in inputs}
        for name, takes in [(n, model.session_conditions) for n in session] + [(n, model.block_conditions)
                                                                               for n in block]:
            if name not in takes:
                raise FdError(f"node {self.name!r}: the model ({type(model).__name__}) takes no {name!r} condition "
                              f"(it takes {', '.join(model.session_conditions + model.block_conditions)})")
        return session, block

    def _start(self, state: ARState, inputs: dict, graphs: bool = True) -> None:
        model = self._model(inputs)
        ph, pw = model.patch_grid()
        lh, lw, nfpb = self.p.latent_height, self.p.latent_width, self.p.frames_per_block
        if lh % ph or lw % pw:
            raise FdError(f"node {self.name!r}: latent {lh}x{lw} is not divisible by the model's patch {ph}x{pw}")
        image = inputs.get("image_latent")
        prefix = 0 if image is None else image.shape[1]
        if image is not None and prefix % nfpb:
            raise FdError(f"node {self.name!r}: image_latent has {prefix} frames, not a multiple of "
                          f"frames_per_block={nfpb}")
        if self.p.window_frames is not None and self.p.window_frames - self.p.sink_frames < max(nfpb, self.first_frames):
            raise FdError(f"node {self.name!r}: window_frames - sink_frames must hold a block of "
                          f"{max(nfpb, self.first_frames)} frames (upstream fails there too)")
        self._check_boundary(model)
        dev = model.device
        session_conds, block_conds = self._conditions(model, inputs)
        capture = bool(self.p.graphs and self.ctx.capture and str(dev).startswith("cuda"))
        graphs = graphs and capture
        spec = StreamSpec(frame_shape=(self.p.latent_channels, lh, lw), frames_per_block=nfpb, batch=self.p.batch,
                          sink_frames=self.p.sink_frames, window_frames=self.p.window_frames,
                          max_frames=prefix + self._frames(self.p.num_blocks), rope_mode=self.p.rope_mode, graphs=graphs)
        key = (id(model), spec)
        spare, self._spare = self._spare, None
        if capture and not graphs and spare is not None and spare[0] == (id(model), dataclasses.replace(spec, graphs=True)):
            key = spare[0]                      # a spare with graphs already captured serves a batched session too
        fresh = spare is None or spare[0] != key
        if not fresh:
            state.stream = spare[1]             # a previous session's cache and captured graphs
            state.stream.reset()
        else:
            try:
                state.stream = model.open_stream(spec)
            except ValueError as e:
                raise FdError(f"node {self.name!r}: {e}") from e
        state.key, state.model = key, model
        seed = int(inputs.get("seed", self.p.seed))
        state.generator = torch.Generator(device=dev).manual_seed(seed)
        if self.p.window_frames is None:
            state.noise = torch.randn(self._noise_shape(self._frames(self.p.num_blocks)), generator=state.generator,
                                      device=dev)
        missing = [c for c in model.required_conditions if c not in session_conds]
        if missing:
            raise FdError(f"node {self.name!r}: the model needs the {', '.join(missing)} condition(s)")
        state.stream.set_conditions(**session_conds)   # copies into the captured static buffers
        state.conditions = session_conds
        if fresh and graphs:  # capture every attended-length graph now, so no block pays a capture
            with torch.no_grad():
                state.stream.prepare(torch.zeros(self._noise_shape(nfpb), device=dev), **block_conds)
        self._graphs = state.stream
        init = None if image is None else image.to(dev, torch.float32).expand(self.p.batch, -1, -1, -1, -1)
        state.rollout = ARRollout(_TimedStream(state, self._record), self._schedule(), nfpb, initial_latent=init,
                                  generator=state.generator, trace=lambda tr: self._classify(state, tr),
                                  first_block_frames=self.p.first_block_frames)

    def _noise_shape(self, frames: int) -> tuple[int, ...]:
        return (self.p.batch, frames, self.p.latent_channels, self.p.latent_height, self.p.latent_width)

    def _classify(self, state: ARState, tr: CallTrace) -> None:
        state.timers.setdefault(KIND_KEYS[tr.kind], []).append(state.pending)
        state.pending = None

    # ------------------------------------------------------------------ running
    def state_tensors(self, state: ARState) -> dict:
        if state.restore is not None:      # restored, no block run since: the snapshot's values are the state
            return dict(state.restore)
        return state_io.save(state)

    def load_state(self, state: ARState, values: dict) -> ARState:
        state.restore = values if values.get("started") else None
        return state

    def _switch(self, state: ARState, inputs: dict) -> None:
        """A session condition changed between blocks: ``prompt_switch`` decides what happens to the cache."""
        mode = self.p.prompt_switch
        if mode == "reset":
            switches = state.prompt_switches + 1
            self._spare = (state.key, state.stream)   # _start takes it back: same buffers, cleared
            graphs = state.key[1].graphs if state.key is not None else True
            state.stream = state.rollout = None
            state.history = []
            self._start(state, inputs, graphs=graphs)
            state.prompt_switches = switches
            return
        state.conditions = self._conditions(state.model, inputs)[0]
        state.stream.set_conditions(**state.conditions)
        if mode == "recache":
            switch.recache(state.stream, state.history)
        state.prompt_switches += 1

    def _restore(self, state: ARState, inputs: dict) -> None:
        """Apply snapshot values to the stream ``_start`` just opened. Restored with other conditions (a new
        prompt on resume), that is a prompt switch: ``reset`` keeps the fresh start, ``recache`` re-runs the
        context passes, ``keep`` only has the new conditions (already set)."""
        values, state.restore = state.restore, None
        switched = values.get("conditions") != state_io.digest(state.conditions)
        if switched and self.p.prompt_switch == "reset":
            state.prompt_switches = int(values["prompt_switches"]) + 1
            return
        try:
            state_io.apply(state, values, self.name)
        except ValueError as e:
            raise FdError(f"restoring a snapshot: {e}") from None
        if switched:
            if self.p.prompt_switch == "recache":
                switch.recache(state.stream, state.history)
            state.prompt_switches += 1

    def _record(self, state: ARState, x, t, frame_start, conditions) -> None:
        """Keep what a context pass committed while the cache holds it (``prompt_switch: recache`` only)."""
        if self.p.prompt_switch != "recache":
            return
        state.history.append(switch.ContextRecord(x.detach().clone(), float(t), int(frame_start), dict(conditions)))
        state.history = switch.retained(state.history, self.p.sink_frames, self.p.window_frames)

    def _next_block(self, inputs, state: ARState, step, batched: bool = False):
        """Open or switch the session as needed; (rollout, block index, the block's noise, block conditions).
        A session that starts inside a batch opens its stream without CUDA graphs: capturing them costs a few
        forwards per attended length, and batched calls run eager, so they would only serve it once alone."""
        if state.rollout is None:
            self._start(state, inputs, graphs=not batched)
            if state.restore is not None:
                self._restore(state, inputs)
        elif step.changed & set(SESSION_CONDITIONS):
            self._switch(state, inputs)
        roll = state.rollout
        b = roll.block_index
        if state.noise is not None:
            if b >= self.p.num_blocks:
                raise FdError(f"node {self.name!r}: block {b} is past num_blocks={self.p.num_blocks}, which sizes "
                              "the global KV cache; raise num_blocks, or set window_frames for an unbounded rollout")
            off = roll.block_offset(b)
            noise = state.noise[:, off:off + roll.block_frames(b)]
        else:
            noise = torch.randn(self._noise_shape(roll.block_frames(b)), generator=state.generator,
                                device=state.model.device)
        state.timers = {}
        return roll, b, noise, self._conditions(state.model, inputs)[1]

    @staticmethod
    def _output(roll: ARRollout, b: int, x0):
        if b == 0 and roll.initial_latent is not None:
            x0 = torch.cat([roll.initial_latent.to(x0.dtype), x0], dim=1)
        return {"latent": x0}

    def run(self, inputs, state: ARState, step):
        roll, b, noise, conds = self._next_block(inputs, state, step)
        x0 = roll.step(noise, **conds)
        self._last = state.timers
        return self._output(roll, b, x0)

    def run_batch(self, inputs: list[dict], states: list[ARState], steps: list) -> list[dict]:
        """Several sessions' next blocks at once (``fd serve``): the rollouts run in lockstep and every round of
        model calls is one ``model.run_together`` (one batched forward where the model supports it). Each session
        keeps its own noise generator, conditions, position and cache, so its latents equal a lone ``run``."""
        prepared = [self._next_block(i, s, st, batched=True) for i, s, st in zip(inputs, states, steps)]
        model = states[0].model
        if any(s.model is not model for s in states):
            return [self._output(r, b, r.step(n, **c)) for (r, b, n, c) in prepared]

        def run_calls(ids: list[int], calls):
            timer = NodeTimer(str(model.device))
            timer.start()
            with torch.no_grad():
                out = model.run_together([states[i].stream for i in ids], calls)
            timer.stop()
            for i, c in zip(ids, calls):
                states[i].pending = timer      # every session's trace files the shared call under its kind
                if c.is_commit:
                    self._record(states[i], c.x, c.t, c.frame_start, c.conditions)
            return out

        x0s = drive_together([r.block_calls(n, **c) for (r, _, n, c) in prepared], run_calls)
        self._last = states[-1].timers
        return [self._output(r, b, x0) for (r, b, _, _), x0 in zip(prepared, x0s)]

    def release(self, state: ARState) -> None:
        """Keep the finished session's stream (cache and captured graphs) for the next session of the same shape."""
        if state.stream is not None and state.key is not None:
            self._spare = (state.key, state.stream)
        state.stream = state.rollout = None

    def memory_estimate(self, upstream) -> dict:
        """The KV cache, cross K/V and noise this sampler makes its model hold (nodes/ar/memory.py)."""
        from .memory import sampler_memory
        return sampler_memory(self.p, upstream.get("model"))

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


class _TimedStream(CausalStream):
    """The session's stream with every call timed (CUDA events on GPU), for ``last_breakdown_ms``."""

    def __init__(self, state: ARState, record=None):
        self.state = state
        self.record = record   # called after every commit (recache history)

    def _timed(self, fn, *args, **kwargs):
        timer = NodeTimer(str(self.state.model.device))
        timer.start()
        with torch.no_grad():
            out = fn(*args, **kwargs)
        timer.stop()
        self.state.pending = timer
        return out

    def set_conditions(self, **conditions) -> None:
        self.state.stream.set_conditions(**conditions)

    def denoise(self, x, t, frame_start, **block):
        return self._timed(self.state.stream.denoise, x, t, frame_start, **block)

    def commit(self, x, t, frame_start, **block) -> None:
        self._timed(self.state.stream.commit, x, t, frame_start, **block)
        if self.record is not None:
            self.record(self.state, x, t, frame_start, block)
