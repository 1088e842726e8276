"""Replicas, the wait queue, pacing, and the rollouts clients drive on a replica.

A replica is one loaded Pipeline plus one worker thread. It serves up to ``max_batch``
rollouts at once: a scheduler (``Replica._pump``, on the event loop) takes the rollouts whose
next block is due and steps them TOGETHER in the worker thread (``engine.session.step_together``:
one DiT forward per denoising step for all of them; each session keeps its own KV cache, prompt,
seed, controls and position, and its frames are bit-identical to running alone). Sessions join
and leave between blocks. More clients than slots wait in a bounded FIFO and are told their
position whenever it changes.

Pacing: a ``realtime`` rollout is due one block ahead of real time at the spec's fps
(``Pacer``), so a client playing at that fps neither starves nor has to drop; the time a paced
session does not need goes to the others (``asap`` rollouts - jobs, benchmarks - are always due).

Control messages never touch a session while its block is running: they are queued on the
rollout and applied between blocks, in the loop thread, which is what makes a prompt switch
(``Session.set_input``) safe without locks.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from statistics import median
from typing import Any, Callable

from engine.errors import FdError
from engine.registry import Registry
from engine.runner import World, ancestors, main_sink, open_pipeline
from engine.spec import Ref, Spec, parse_ref

from .encode import JpegEncoder
from .protocol import FrameHeader, ProtocolError
from .saves import SavedPoints


# --------------------------------------------------------------------------- what is streamed
@dataclass
class StreamSource:
    """The spec reduced to what produces the streamed frames: no sinks (no files written while serving)."""
    spec: Spec           # as loaded, sinks included (for names, fps, inputs)
    served: Spec         # the main sink's ancestors only
    frames: Ref          # node.port whose value is the streamed [B, T, 3, H, W] pixels
    main_sink: str
    fps: int

    @property
    def controls(self) -> list[str]:
        return [k for k in ("camera", "action") if k in self.spec.inputs]

    @property
    def max_blocks(self) -> int:
        return int(self.spec.inputs.get("num_blocks", 1))


def stream_source(spec: Spec, registry: Registry) -> StreamSource:
    main = main_sink(spec, registry)
    if main is None:
        raise FdError(f"{spec.file}: the spec has no sink, so there is nothing to stream")
    ref = parse_ref(spec.nodes[main].wires.get("frames") if isinstance(spec.nodes[main].wires, dict) else None)
    if ref is None or ref.node == "inputs" or ref.node not in spec.nodes:
        raise FdError(f"{spec.file}: main sink {main!r} has no `frames` input wired to a node; "
                      "fd serve streams that input")
    fps = spec.nodes[main].params.get("fps", 16)
    return StreamSource(spec, ancestors(spec, ref.node), ref, main, int(fps) if isinstance(fps, int) else 16)


PACES = ("realtime", "asap")


class Pacer:
    """When a rollout's next block is due. ``realtime``: one block ahead of playback at ``fps`` - block k may
    start once the frames before the previous block have played, counted from the first block's delivery;
    ``asap``: always. ``clock`` is injectable (tests run it on a fake clock)."""

    def __init__(self, fps: float, pace: str = "realtime", clock: Callable[[], float] = time.monotonic):
        if pace not in PACES:
            raise ValueError(f"pace must be one of {PACES}, got {pace!r}")
        self.fps, self.pace, self.clock = float(fps), pace, clock
        self.start: float | None = None
        self.frames = 0          # frames delivered since start
        self.lead = 0            # frames of the last block: how far ahead of playback generation may run
        self.deliveries = 0
        self.recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)

    def due(self) -> float:
        if self.pace == "asap" or self.start is None:
            return -math.inf
        return self.start + max(0, self.frames - self.lead) / self.fps

    def delivered(self, frames: int) -> None:
        now = self.clock()
        if self.start is None:
            self.start = now
        self.frames += frames
        self.lead = frames
        self.deliveries += 1
        if self.deliveries > 1:      # block 0 starts playback; from block 1 on, blocks come at the paced rate
            self.recent.append((now, frames))

    def restart(self) -> None:
        """A reset or branch: playback starts over."""
        self.start, self.frames, self.lead, self.deliveries = None, 0, 0, 0
        self.recent.clear()

    def fps_measured(self, window_s: float = 5.0) -> float | None:
        """Frames generated per second over the last ``window_s`` (deliveries after the first in the window)."""
        now = self.clock()
        pts = [(t, n) for t, n in self.recent if now - t <= window_s]
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            return None
        return sum(n for _, n in pts[1:]) / (pts[-1][0] - pts[0][0])


def due_batch(rollouts, now: float, max_batch: int) -> list:
    """The rollouts (each with ``pacer`` and ``seq``) whose next block is due at ``now``, most overdue first
    (then oldest), at most ``max_batch``: what the replica steps together next."""
    due = sorted((r.pacer.due(), r.seq, r) for r in rollouts if r.pacer.due() <= now)
    return [r for _, _, r in due[:max_batch]]


class Replica:
    """One loaded pipeline, the single thread that runs its (batched) blocks, and its scheduler."""

    def __init__(self, index: int, source: StreamSource, registry: Registry, max_batch: int = 8,
                 clock: Callable[[], float] = time.monotonic):
        self.index = index
        self.source = source
        self.max_batch = max(1, max_batch)
        self.clock = clock
        self.pipeline = open_pipeline(source.served, registry=registry, world=World())
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fd-replica-{index}")
        self.encoders = ThreadPoolExecutor(max_workers=max(2, min(8, (os.cpu_count() or 2) // 2)),
                                           thread_name_prefix=f"fd-encode-{index}")
        self.frame_size: tuple[int, int] | None = None
        self.reserved = 0                       # granted slots (rollouts running or about to start)
        self.batches = 0
        self.batch_sizes: collections.Counter = collections.Counter()
        self.batch_size_last = 0
        self._requests: dict[Rollout, asyncio.Future] = {}
        self._running: set[Rollout] = set()
        self._wake: asyncio.Event | None = None
        self._pump_task: asyncio.Task | None = None
        self._last_batch_s = 0.0
        self.rollouts: set[Rollout] = set()       # live rollouts on this replica

    def warm_up(self) -> None:
        """Load weights and run one block (first-call allocations, kernel selection), then drop that session."""
        self.pipeline.load()
        session = self.pipeline.open_session()
        try:
            result = session.step()
            pixels = result.outputs[self.source.frames.node][self.source.frames.port]
            self.frame_size = (int(pixels.shape[-1]), int(pixels.shape[-2]))
            JpegEncoder().encode(_to_frames(pixels)[0])
        finally:
            session.close()

    @property
    def free_slots(self) -> int:
        return self.max_batch - self.reserved

    # ---- the scheduler
    async def run_block(self, rollout: "Rollout") -> list:
        """The rollout's next block (its BlockResult-derived frames), stepped with whichever other rollouts are
        due at the same time. Raises what the block raised."""
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = loop.create_task(self._pump(), name=f"fd-replica-{self.index}-pump")
        fut = loop.create_future()
        self._requests[rollout] = fut
        self._wake.set()
        return await fut

    def withdraw(self, rollout: "Rollout") -> bool:
        """Take back a request not picked up yet (the rollout is stopping); False when its block already runs."""
        fut = self._requests.pop(rollout, None)
        if fut is not None and not fut.done():
            fut.cancel()
        return rollout not in self._running

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._requests:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = self.clock()
            batch = due_batch(self._requests, now, self.max_batch)
            if batch and len(batch) < self.max_batch:
                if await self._gather(now):
                    continue                    # someone else became ready: form the batch again
                # a rollout that stopped during the window withdrew its request: never pop it (a KeyError here
                # would end the pump with the other members' futures popped and never answered)
                batch = [r for r in batch if r in self._requests]
            if not batch:
                wait = min(r.pacer.due() for r in self._requests) - now
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, wait))
                except asyncio.TimeoutError:
                    pass
                continue
            futs = [self._requests.pop(r) for r in batch]
            self._running = set(batch)
            t_batch = self.clock()
            self.batches += 1
            self.batch_size_last = len(batch)
            self.batch_sizes[len(batch)] += 1
            try:
                outs = await loop.run_in_executor(self.executor, self._step, [r.session for r in batch])
            except Exception as e:        # the whole batch failed (step_together aborts all its sessions)
                outs = [e] * len(batch)
            finally:
                self._running = set()
                self._last_batch_s = self.clock() - t_batch
            for fut, out in zip(futs, outs):
                if fut.done():
                    continue
                if isinstance(out, Exception):
                    fut.set_exception(out)
                else:
                    fut.set_result(out)
            # let the batch's rollouts take their results and ask for their next block before the next batch
            # is formed: otherwise sessions that once ran apart keep alternating instead of merging
            for _ in range(2):
                await asyncio.sleep(0)

    async def _gather(self, now: float) -> bool:
        """A batching window: when live rollouts that will be due by then have not asked yet (still delivering
        their last block), wait for them a little - a fifth of the last batch's time, at most 0.1 s - so that
        sessions which once ran apart merge into one batch instead of alternating. True when one asked."""
        window = min(0.2 * self._last_batch_s, 0.1)
        if window <= 0:
            return False
        late = [r for r in self.rollouts if r not in self._requests and r not in self._running and r.wants_block(now + window)]
        if not late:
            return False
        n = len(self._requests)
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=window)
        except asyncio.TimeoutError:
            return False
        return len(self._requests) > n

    def _step(self, sessions) -> list:
        """Worker thread: one block of every session (together), as (block, uint8 frames [T, H, W, 3], ms)."""
        from engine.session import step_together
        t0 = time.perf_counter()
        results = step_together(sessions)
        frames = [_to_frames(r.outputs[self.source.frames.node][self.source.frames.port]) for r in results]
        ms = (time.perf_counter() - t0) * 1e3
        return [(r.block, f, ms) for r, f in zip(results, frames)]

    def stats(self) -> dict:
        mem = _gpu_memory(self.pipeline)
        return {"index": self.index, "sessions": self.reserved, "free_slots": self.free_slots,
                "batches": self.batches, "batch_size_last": self.batch_size_last,
                "batch_sizes": dict(sorted(self.batch_sizes.items())), **mem}

    def shutdown(self) -> None:
        if self._pump_task is not None:
            self._pump_task.get_loop().call_soon_threadsafe(self._pump_task.cancel)
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.encoders.shutdown(wait=True, cancel_futures=True)


def _gpu_memory(pipeline) -> dict:
    """CUDA memory of the device the pipeline's nodes run on (None on CPU)."""
    devs = {str(n.device) for n in pipeline.nodes.values()} if pipeline.nodes else set()
    cuda = sorted(d for d in devs if d.startswith("cuda"))
    if not cuda:
        return {"gpu_memory_allocated_bytes": None, "gpu_memory_reserved_bytes": None}
    import torch
    return {"gpu_memory_allocated_bytes": int(torch.cuda.memory_allocated(cuda[0])),
            "gpu_memory_reserved_bytes": int(torch.cuda.memory_reserved(cuda[0]))}


def _to_frames(pixels):
    from engine.frames import to_uint8_frames
    return to_uint8_frames(pixels)


# --------------------------------------------------------------------------- per-client outbox
class Outbox:
    """What the server still has to send one client: control messages (in order) and the latest
    ``max_frames`` frames. Pushing a frame onto a full outbox drops the oldest one, so a slow client
    sees a choppier stream rather than a growing delay, and memory stays bounded. Per-block status
    messages are droppable too; if even the essential ones pile up past ``max_control`` the client is
    not reading at all, and the outbox closes itself (``overflowed``) so the connection is dropped."""

    def __init__(self, max_frames: int = 2, max_control: int = 256):
        self.max_frames = max(1, max_frames)
        self.max_control = max_control
        self._frames: collections.deque[bytes] = collections.deque()
        self._control: collections.deque[dict] = collections.deque()
        self._ready = asyncio.Event()
        self.closed = False
        self.overflowed = False
        self.dropped = 0

    def push_json(self, msg: dict, droppable: bool = False) -> None:
        if self.closed:
            return
        if droppable and len(self._control) >= max(1, self.max_control // 8):
            return
        if len(self._control) >= self.max_control:
            self.overflowed = True
            self.close()
            return
        self._control.append(msg)
        self._ready.set()

    def push_frame(self, data: bytes) -> bool:
        """Queue a frame; True when an older frame had to be dropped for it."""
        if self.closed:
            return False
        dropped = len(self._frames) >= self.max_frames
        if dropped:
            self._frames.popleft()
            self.dropped += 1
        self._frames.append(data)
        self._ready.set()
        return dropped

    def clear_frames(self) -> None:
        self._frames.clear()

    def close(self) -> None:
        self.closed = True
        self._frames.clear()
        self._control.clear()
        self._ready.set()

    def __len__(self) -> int:
        return len(self._frames) + len(self._control)

    @property
    def frames_queued(self) -> int:
        return len(self._frames)

    async def get(self) -> dict | bytes | None:
        """Next thing to send (control messages first); None once closed."""
        while True:
            if self.closed:
                return None
            if self._control:
                return self._control.popleft()
            if self._frames:
                return self._frames.popleft()
            self._ready.clear()
            await self._ready.wait()


# --------------------------------------------------------------------------- metrics
@dataclass
class Metrics:
    started_at: float = field(default_factory=time.time)
    blocks_served: int = 0
    frames_sent: int = 0
    frames_dropped: int = 0
    sessions_started: int = 0
    block_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=512))
    encode_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=512))
    first_frame_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=128))

    @staticmethod
    def _summary(values) -> dict:
        v = sorted(values)
        if not v:
            return {"count": 0}
        return {"count": len(v), "last": round(values[-1], 3), "median": round(median(v), 3),
                "p90": round(v[min(len(v) - 1, int(0.9 * len(v)))], 3), "max": round(v[-1], 3)}

    def snapshot(self) -> dict:
        return {"uptime_s": round(time.time() - self.started_at, 3), "blocks_served": self.blocks_served,
                "frames_sent": self.frames_sent, "frames_dropped": self.frames_dropped,
                "sessions_started": self.sessions_started, "block_ms": self._summary(self.block_ms),
                "encode_ms": self._summary(self.encode_ms), "first_frame_ms": self._summary(self.first_frame_ms)}


# --------------------------------------------------------------------------- queue
class QueueFull(RuntimeError):
    pass


class Ticket:
    """A client's place in line; ``granted`` resolves to the replica it gets."""

    def __init__(self, on_position: Callable[[int], None]):
        self.granted: asyncio.Future = asyncio.get_running_loop().create_future()
        self.on_position = on_position
        self.position = 0


class SessionManager:
    """Replicas and their free slots, the FIFO of waiting tickets, the live rollouts, the session-id counter."""

    def __init__(self, max_queue: int = 8, max_batch: int = 8, pace: str = "realtime",
                 clock: Callable[[], float] = time.monotonic):
        if pace not in PACES:
            raise ValueError(f"pace must be one of {PACES}, got {pace!r}")
        self.max_queue = max_queue
        self.max_batch = max(1, max_batch)
        self.pace = pace
        self.clock = clock
        self.replicas: list[Replica] = []
        self.ready: list[Replica] = []
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.live: set["Rollout"] = set()
        self._ids = itertools.count(1)
        self._seq = itertools.count()

    def new_session_id(self) -> int:
        return next(self._ids)

    def rollouts(self) -> list["Rollout"]:
        """The live rollouts, oldest first."""
        return sorted(self.live, key=lambda r: r.seq)

    @property
    def active(self) -> dict[int, "Rollout"]:
        """Live rollouts by session id."""
        return {r.session_id: r for r in self.rollouts()}

    @property
    def free(self) -> list[Replica]:
        """Ready replicas with a free slot."""
        return [r for r in self.ready if r.free_slots > 0]

    def add_replica(self, replica: Replica, ready: bool = True) -> None:
        self.replicas.append(replica)
        replica.max_batch = min(replica.max_batch, self.max_batch)
        if ready:
            self.make_ready(replica)

    def make_ready(self, replica: Replica) -> None:
        if replica not in self.ready:
            self.ready.append(replica)
        self._dispatch()

    def enqueue(self, on_position: Callable[[int], None]) -> Ticket:
        if not self.free and len(self.waiting) >= self.max_queue:
            raise QueueFull(f"server busy: {len(self.waiting)} client(s) already waiting (max {self.max_queue})")
        ticket = Ticket(on_position)
        self.waiting.append(ticket)
        self._dispatch()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        if ticket in self.waiting:
            self.waiting.remove(ticket)
            self._dispatch()
        elif ticket.granted.done() and not ticket.granted.cancelled():
            self.release(ticket.granted.result())   # granted but never used
        ticket.granted.cancel()

    def release(self, replica: Replica) -> None:
        """A granted slot is free again."""
        replica.reserved = max(0, replica.reserved - 1)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.waiting:
            free = self.free
            if not free:
                break
            replica = max(free, key=lambda r: r.free_slots)   # the least loaded replica
            ticket = self.waiting.popleft()
            replica.reserved += 1
            ticket.granted.set_result(replica)
        for i, t in enumerate(self.waiting, start=1):
            if t.position != i:
                t.position = i
                t.on_position(i)

    def stats(self) -> dict:
        """Queue depth, per replica (sessions, batches, GPU memory) and per session (fps, block ms, drops)."""
        return {"queue_depth": len(self.waiting), "max_batch": self.max_batch,
                "replicas": [r.stats() for r in self.replicas],
                "sessions": [r.stats() for r in self.rollouts()]}


# --------------------------------------------------------------------------- a rollout
@dataclass
class StepOutput:
    block: int
    jpegs: list[bytes]
    width: int
    height: int
    step_ms: float          # the block's compute (shared by every session of its batch)
    encode_ms: float
    frames: Any = None      # uint8 numpy [T, H, W, 3]


class Rollout:
    """One client's session on one replica: a loop that asks the replica for its blocks (paced, batched with
    the other rollouts due at the same time) and applies queued controls between them.

    ``outbox=None`` makes a headless rollout (a job): no JPEG encoding, ``on_block(StepOutput)`` gets each
    block's frames, and the rollout ends by itself after ``blocks`` blocks (stop_reason "done")."""

    def __init__(self, manager: SessionManager, replica: Replica, outbox: Outbox | None, metrics: Metrics, *,
                 inputs: dict[str, Any], blocks: int, quality: int, requested_at: float,
                 pace: str | None = None, on_block: Callable[[StepOutput], None] | None = None):
        self.manager, self.replica, self.outbox, self.metrics = manager, replica, outbox, metrics
        self.source = replica.source
        self.inputs = inputs
        self.blocks = blocks
        self.encoder = JpegEncoder(quality)
        self.requested_at = requested_at
        self.session_id = manager.new_session_id()
        self.seq = next(manager._seq)
        self.pacer = Pacer(self.source.fps, pace or manager.pace, manager.clock)
        self.on_block = on_block
        self.session = None
        self.frame_index = 0
        self.frames_sent = 0
        self.frames_dropped = 0
        self.last_block_ms: float | None = None
        self.paused = False
        self.done = False
        self.idle_since: float | None = None
        self.stop_reason: str | None = None
        self._ops: collections.deque[tuple[str, Any]] = collections.deque()
        self.saves = SavedPoints()
        self._wake = asyncio.Event()
        self._inflight: asyncio.Future | None = None
        self._deliveries: collections.deque[asyncio.Task] = collections.deque()
        self.task: asyncio.Task | None = None
        self.on_end: Callable[["Rollout"], None] | None = None
        manager.live.add(self)
        replica.rollouts.add(self)

    @property
    def pace(self) -> str:
        return self.pacer.pace

    def wants_block(self, by: float) -> bool:
        """Will ask for a block by time ``by`` (streaming, not paused or finished, paced due by then)."""
        return (self.stop_reason is None and self.session is not None and not self.paused and not self.done
                and self.session.block < self.blocks and self.pacer.due() <= by)

    @property
    def in_block(self) -> bool:
        """A call of this rollout runs in the replica's thread now (a block, or opening the session)."""
        return self in self.replica._running or self._inflight is not None

    def _send(self, msg: dict, droppable: bool = False) -> None:
        if self.outbox is not None:
            self.outbox.push_json(msg, droppable)

    # ---- what the connection calls
    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"rollout-{self.session_id}")

    def post(self, op: str, value: Any = None) -> None:
        """Queue a control (prompt, camera, action, pause, resume, reset, pace) for the next block boundary."""
        self._ops.append((op, value))
        self._wake.set()

    async def stop(self, reason: str) -> None:
        """End the rollout: a block not started yet is withdrawn, one in flight finishes first; frees the slot."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self._wake.set()
        self.replica.withdraw(self)
        if self.task is not None and not self.task.done():
            await asyncio.shield(self.task)

    def stats(self) -> dict:
        fps = self.pacer.fps_measured()
        return {"session": self.session_id, "replica": self.replica.index, "pace": self.pace,
                "block": self.session.block if self.session is not None else 0, "blocks": self.blocks,
                "paused": self.paused, "done": self.done, "fps": round(fps, 3) if fps else None,
                "block_ms": round(self.last_block_ms, 3) if self.last_block_ms is not None else None,
                "frames_sent": self.frames_sent, "frames_dropped": self.frames_dropped}

    # ---- the loop
    async def _in_thread(self, fn):
        """Run ``fn`` on the replica's thread; a cancelled caller does not abandon a running call."""
        self._inflight = asyncio.wrap_future(self.replica.executor.submit(fn))
        try:
            return await asyncio.shield(self._inflight)
        finally:
            if self._inflight.done():
                self._inflight = None

    async def _run(self) -> None:
        try:
            pipe = self.replica.pipeline
            if pipe.loaded:   # opening is cheap (per-node state objects): no wait behind a running batch
                self.session = pipe.open_session(**self.inputs)
            else:
                self.session = await self._in_thread(lambda: pipe.open_session(**self.inputs))
            self.metrics.sessions_started += 1
            self._send({"type": "started", "session": self.session_id, "blocks": self.blocks,
                        "replica": self.replica.index, "prompt": self.inputs.get("prompt"),
                        "seed": self.inputs.get("seed"), "pace": self.pace})
            while self.stop_reason is None:
                if self.outbox is not None and self.outbox.closed:
                    self.stop_reason = "disconnected"
                    break
                if self._ops or self.session.block >= self.blocks:
                    await self._settle(0)      # the blocks made so far reach the client before what follows
                self._apply_ops()
                if self.stop_reason is not None:
                    break
                if not self.done and self.session.block >= self.blocks:
                    self.done = True
                    self.idle_since = time.monotonic()
                    self._send({"type": "done", "session": self.session_id, "blocks": self.session.block})
                    if self.outbox is None:
                        self.stop_reason = "done"
                        break
                if self.paused or self.done:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._settle(1)          # at most one block encoding while the next one is computed
                block, frames, ms = await self.replica.run_block(self)
                self.pacer.delivered(len(frames))
                # deliver in the background: this loop asks for the next block right away, so the replica's
                # next batch finds it waiting (sessions stay batched together instead of alternating)
                previous = self._deliveries[-1] if self._deliveries else None
                self._deliveries.append(asyncio.get_running_loop().create_task(
                    self._deliver_after(previous, block, frames, ms)))
        except asyncio.CancelledError:
            self.stop_reason = self.stop_reason or "cancelled"
        except Exception as e:  # a failing node ends this rollout, not the server
            self.stop_reason = "error"
            self._send({"type": "error", "message": f"block failed: {e}"})
        finally:
            await self._cleanup()

    def _apply_ops(self) -> None:
        while self._ops:
            op, value = self._ops.popleft()
            if op == "pause" and not self.paused:
                self.paused = True
                self.idle_since = time.monotonic()
                self._send({"type": "paused", "session": self.session_id, "block": self.session.block})
            elif op == "resume" and self.paused:
                self.paused = False
                self.idle_since = time.monotonic() if self.done else None
                self.pacer.restart()       # playback resumes now, not where the pause interrupted it
                self._send({"type": "resumed", "session": self.session_id, "block": self.session.block})
            elif op == "reset":
                self.session.reset()
                old, self.session_id = self.session_id, self.manager.new_session_id()
                self.frame_index, self.done = 0, False
                self.pacer.restart()
                self.idle_since = time.monotonic() if self.paused else None
                if self.outbox is not None:
                    self.outbox.clear_frames()
                self._send({"type": "reset", "session": self.session_id, "previous": old})
            elif op == "save":
                number, block = self.saves.save(self.session)
                self._send({"type": "saved", "session": self.session_id, "save": number, "block": block})
            elif op == "branch":
                self._branch(value)
            elif op == "pace":
                self.pacer.pace = value if value in PACES else self.pacer.pace
                self.pacer.restart()
            elif op in ("prompt", "camera", "action"):
                self.session.set_input(op, value)
                self.inputs[op] = value
                if op == "prompt":
                    self._send({"type": "prompt", "session": self.session_id, "prompt": value,
                                "block": self.session.block})

    def _branch(self, msg: dict) -> None:
        """Back to a saved point (engine snapshot), as a new session id so the page drops the old branch's frames."""
        try:
            block = self.saves.branch(self.session, msg["save"], msg.get("prompt"))
        except (ProtocolError, FdError) as e:
            self._send({"type": "error", "message": str(e)})
            return
        if "prompt" in msg:
            self.inputs["prompt"] = msg["prompt"]
        old, self.session_id = self.session_id, self.manager.new_session_id()
        self.done = False
        self.pacer.restart()
        self.idle_since = time.monotonic() if self.paused else None
        if self.outbox is not None:
            self.outbox.clear_frames()
        self._send({"type": "branched", "session": self.session_id, "previous": old,
                    "save": msg["save"], "block": block})

    async def _settle(self, keep: int) -> None:
        """Wait until at most ``keep`` block deliveries are under way (a failed one raises here)."""
        while len(self._deliveries) > keep:
            await self._deliveries.popleft()

    async def _deliver_after(self, previous: asyncio.Task | None, block: int, frames, ms: float) -> None:
        if previous is not None:
            await asyncio.wait([previous])     # in order; its error is raised where it is settled
        await self._deliver(block, frames, ms)

    def _encode(self, frames) -> tuple[list[bytes], float]:
        t0 = time.perf_counter()
        jpegs = [self.encoder.encode(f) for f in frames]
        return jpegs, (time.perf_counter() - t0) * 1e3

    async def _deliver(self, block: int, frames, ms: float) -> None:
        h, w = frames.shape[1:3]
        if self.outbox is None:
            jpegs, enc_ms = [], 0.0
        else:   # JPEG encoding off the replica's thread: the next batch runs meanwhile
            jpegs, enc_ms = await asyncio.get_running_loop().run_in_executor(self.replica.encoders, self._encode,
                                                                             frames)
        out = StepOutput(block, jpegs, int(w), int(h), ms, enc_ms, frames)
        self.last_block_ms = ms
        self.metrics.blocks_served += 1
        self.metrics.block_ms.append(ms)
        self.metrics.encode_ms.append(enc_ms)
        if self.on_block is not None:
            self.on_block(out)
        if self.requested_at is not None and block == 0:
            self.metrics.first_frame_ms.append((time.monotonic() - self.requested_at) * 1e3)
            self.requested_at = None
        if self.outbox is None:
            self.frame_index += len(frames)
            return
        self._send({"type": "block", "session": self.session_id, "block": block, "frames": len(jpegs),
                    "ms": round(ms, 3), "encode_ms": round(enc_ms, 3)}, droppable=True)
        for i, jpeg in enumerate(jpegs):
            header = FrameHeader(self.session_id, block, self.frame_index, int(w), int(h),
                                 time.time() * 1e3, last_in_block=(i == len(jpegs) - 1))
            self.frame_index += 1
            if self.outbox.push_frame(header.pack(jpeg)):
                self.metrics.frames_dropped += 1
                self.frames_dropped += 1
            self.metrics.frames_sent += 1
            self.frames_sent += 1
            await asyncio.sleep(0)   # let the sender take it: a reading client gets every frame

    async def _cleanup(self) -> None:
        if self._inflight is not None:          # disconnected mid-call: let it finish first
            try:
                await self._inflight
            except BaseException:
                pass
            self._inflight = None
        self.replica.withdraw(self)
        while self in self.replica._running:    # our block is in a batch in flight: the session is in use
            await asyncio.sleep(0.005)
        while self._deliveries:                 # frames already made still go out (or fail quietly)
            try:
                await self._deliveries.popleft()
            except BaseException:
                pass
        if self.session is not None:
            self.session.close()   # no sinks in a served plan: this only marks the state as done
            self.session = None    # drop KV caches before the next client's session allocates its own
        self._send({"type": "stopped", "session": self.session_id, "reason": self.stop_reason})
        self.manager.live.discard(self)
        self.replica.rollouts.discard(self)
        self.manager.release(self.replica)
        if self.on_end is not None:
            self.on_end(self)
