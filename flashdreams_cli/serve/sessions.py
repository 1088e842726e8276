"""Replicas, the wait queue, and the rollout a client drives on a replica.

A replica is one loaded Pipeline plus one worker thread. It runs one rollout at a
time: model state (KV caches) is per session and the GPU is saturated by one
stream, so concurrent clients wait in a bounded FIFO queue and are told their
position whenever it changes. ``Session.step()`` blocks for a whole block, so it
runs in the replica's thread and the event loop keeps answering pings, queue
updates and other clients meanwhile.

Control messages never touch the session while a block is running: they are
queued on the rollout and applied between blocks, in the loop thread, which is
what makes a prompt switch (``Session.set_input``) safe without locks.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
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


class Replica:
    """One loaded pipeline and the single thread that runs its blocks."""

    def __init__(self, index: int, source: StreamSource, registry: Registry):
        self.index = index
        self.source = source
        self.pipeline = open_pipeline(source.served, registry=registry, world=World())
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fd-replica-{index}")
        self.frame_size: tuple[int, int] | None = None

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

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


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
    """Free replicas, the FIFO of waiting tickets, and the session-id counter."""

    def __init__(self, max_queue: int = 8):
        self.max_queue = max_queue
        self.replicas: list[Replica] = []
        self.free: collections.deque[Replica] = collections.deque()
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.active: dict[int, "Rollout"] = {}     # replica index -> rollout
        self._ids = itertools.count(1)

    def new_session_id(self) -> int:
        return next(self._ids)

    def add_replica(self, replica: Replica, ready: bool = True) -> None:
        self.replicas.append(replica)
        if ready:
            self.make_ready(replica)

    def make_ready(self, replica: Replica) -> None:
        self.free.append(replica)
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
        self.active.pop(replica.index, None)
        self.free.append(replica)
        self._dispatch()

    def _dispatch(self) -> None:
        while self.free and self.waiting:
            ticket = self.waiting.popleft()
            ticket.granted.set_result(self.free.popleft())
        for i, t in enumerate(self.waiting, start=1):
            if t.position != i:
                t.position = i
                t.on_position(i)


# --------------------------------------------------------------------------- a rollout
@dataclass
class StepOutput:
    block: int
    jpegs: list[bytes]
    width: int
    height: int
    step_ms: float
    encode_ms: float


class Rollout:
    """One client's session on one replica: a loop that steps blocks and applies queued controls between them."""

    def __init__(self, manager: SessionManager, replica: Replica, outbox: Outbox, metrics: Metrics, *,
                 inputs: dict[str, Any], blocks: int, quality: int, requested_at: float):
        self.manager, self.replica, self.outbox, self.metrics = manager, replica, outbox, metrics
        self.source = replica.source
        self.inputs = inputs
        self.blocks = blocks
        self.encoder = JpegEncoder(quality)
        self.requested_at = requested_at
        self.session_id = manager.new_session_id()
        self.session = None
        self.frame_index = 0
        self.paused = False
        self.done = False
        self.idle_since: float | None = None
        self.stop_reason: str | None = None
        self._ops: collections.deque[tuple[str, Any]] = collections.deque()
        self.saves = SavedPoints()
        self._wake = asyncio.Event()
        self._inflight: asyncio.Future | None = None
        self.task: asyncio.Task | None = None
        self.on_end: Callable[["Rollout"], None] | None = None
        manager.active[replica.index] = self

    # ---- what the connection calls
    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"rollout-{self.session_id}")

    def post(self, op: str, value: Any = None) -> None:
        """Queue a control (prompt, camera, action, pause, resume, reset) for the next block boundary."""
        self._ops.append((op, value))
        self._wake.set()

    async def stop(self, reason: str) -> None:
        """End the rollout; waits for a block in flight to finish, then frees the replica."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self._wake.set()
        if self.task is not None and not self.task.done():
            await asyncio.shield(self.task)

    # ---- the loop
    async def _in_thread(self, fn):
        """Run ``fn`` on the replica's thread; a cancelled caller does not abandon a running block."""
        self._inflight = asyncio.wrap_future(self.replica.executor.submit(fn))
        try:
            return await asyncio.shield(self._inflight)
        finally:
            if self._inflight.done():
                self._inflight = None

    async def _run(self) -> None:
        try:
            self.session = await self._in_thread(lambda: self.replica.pipeline.open_session(**self.inputs))
            self.metrics.sessions_started += 1
            self.outbox.push_json({"type": "started", "session": self.session_id, "blocks": self.blocks,
                                   "replica": self.replica.index, "prompt": self.inputs.get("prompt"),
                                   "seed": self.inputs.get("seed")})
            while self.stop_reason is None:
                if self.outbox.closed:
                    self.stop_reason = "disconnected"
                    break
                self._apply_ops()
                if self.stop_reason is not None:
                    break
                if not self.done and self.session.block >= self.blocks:
                    self.done = True
                    self.idle_since = time.monotonic()
                    self.outbox.push_json({"type": "done", "session": self.session_id, "blocks": self.session.block})
                if self.paused or self.done:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                out = await self._in_thread(self._step_and_encode)
                await self._deliver(out)
        except asyncio.CancelledError:
            self.stop_reason = self.stop_reason or "cancelled"
        except Exception as e:  # a failing node ends this rollout, not the server
            self.stop_reason = "error"
            self.outbox.push_json({"type": "error", "message": f"block failed: {e}"})
        finally:
            await self._cleanup()

    def _apply_ops(self) -> None:
        while self._ops:
            op, value = self._ops.popleft()
            if op == "pause" and not self.paused:
                self.paused = True
                self.idle_since = time.monotonic()
                self.outbox.push_json({"type": "paused", "session": self.session_id, "block": self.session.block})
            elif op == "resume" and self.paused:
                self.paused = False
                self.idle_since = time.monotonic() if self.done else None
                self.outbox.push_json({"type": "resumed", "session": self.session_id, "block": self.session.block})
            elif op == "reset":
                self.session.reset()
                old, self.session_id = self.session_id, self.manager.new_session_id()
                self.frame_index, self.done = 0, False
                self.idle_since = time.monotonic() if self.paused else None
                self.outbox.clear_frames()
                self.outbox.push_json({"type": "reset", "session": self.session_id, "previous": old})
            elif op == "save":
                number, block = self.saves.save(self.session)
                self.outbox.push_json({"type": "saved", "session": self.session_id, "save": number, "block": block})
            elif op == "branch":
                self._branch(value)
            elif op in ("prompt", "camera", "action"):
                self.session.set_input(op, value)
                self.inputs[op] = value
                if op == "prompt":
                    self.outbox.push_json({"type": "prompt", "session": self.session_id, "prompt": value,
                                           "block": self.session.block})

    def _branch(self, msg: dict) -> None:
        """Back to a saved point (engine snapshot), as a new session id so the page drops the old branch's frames."""
        try:
            block = self.saves.branch(self.session, msg["save"], msg.get("prompt"))
        except (ProtocolError, FdError) as e:
            self.outbox.push_json({"type": "error", "message": str(e)})
            return
        if "prompt" in msg:
            self.inputs["prompt"] = msg["prompt"]
        old, self.session_id = self.session_id, self.manager.new_session_id()
        self.done = False
        self.idle_since = time.monotonic() if self.paused else None
        self.outbox.clear_frames()
        self.outbox.push_json({"type": "branched", "session": self.session_id, "previous": old,
                               "save": msg["save"], "block": block})

    def _step_and_encode(self) -> StepOutput:
        t0 = time.perf_counter()
        result = self.session.step()
        pixels = result.outputs[self.source.frames.node][self.source.frames.port]
        t1 = time.perf_counter()
        frames = _to_frames(pixels)
        jpegs = [self.encoder.encode(f) for f in frames]
        t2 = time.perf_counter()
        h, w = frames.shape[1:3]
        return StepOutput(result.block, jpegs, int(w), int(h), (t1 - t0) * 1e3, (t2 - t1) * 1e3)

    async def _deliver(self, out: StepOutput) -> None:
        self.metrics.blocks_served += 1
        self.metrics.block_ms.append(out.step_ms)
        self.metrics.encode_ms.append(out.encode_ms)
        self.outbox.push_json({"type": "block", "session": self.session_id, "block": out.block,
                               "frames": len(out.jpegs), "ms": round(out.step_ms, 3),
                               "encode_ms": round(out.encode_ms, 3)}, droppable=True)
        for i, jpeg in enumerate(out.jpegs):
            header = FrameHeader(self.session_id, out.block, self.frame_index, out.width, out.height,
                                 time.time() * 1e3, last_in_block=(i == len(out.jpegs) - 1))
            if self.frame_index == 0 and out.block == 0 and self.requested_at is not None:
                self.metrics.first_frame_ms.append((time.monotonic() - self.requested_at) * 1e3)
                self.requested_at = None
            self.frame_index += 1
            if self.outbox.push_frame(header.pack(jpeg)):
                self.metrics.frames_dropped += 1
            self.metrics.frames_sent += 1
            await asyncio.sleep(0)   # let the sender take it: a reading client gets every frame

    async def _cleanup(self) -> None:
        if self._inflight is not None:          # disconnected mid-block: let the block finish first
            try:
                await self._inflight
            except BaseException:
                pass
            self._inflight = None
        if self.session is not None:
            self.session.close()   # no sinks in a served plan: this only marks the state as done
            self.session = None    # drop KV caches before the next client's session allocates its own
        self.outbox.push_json({"type": "stopped", "session": self.session_id, "reason": self.stop_reason})
        self.manager.release(self.replica)
        if self.on_end is not None:
            self.on_end(self)
