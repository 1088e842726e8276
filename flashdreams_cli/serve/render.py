"""A video job on a local replica: wait in the shared queue, run the blocks it needs, encode an MP4 in memory.

The job takes a slot through the same FIFO as the live WebSocket sessions (``SessionManager.enqueue``) and runs
as a headless ``Rollout`` (no outbox, ``pace="asap"``): it is batched with the live sessions of its replica and
gets the GPU time their real-time pacing leaves over. Cancelling stops it at the next block boundary; frames
past the requested count are trimmed (a spec makes whole blocks).
"""
from __future__ import annotations

import asyncio
import io
import time
from fractions import Fraction

import numpy as np

from .sessions import QueueFull, Rollout
from .videos import ApiError, Job, JobCancelled


def blocks_needed(want: int | None, block_frames: list[int], max_blocks: int) -> int:
    """Blocks that make ``want`` frames, when the frames per block are known (block 0 may differ); else all."""
    if want is None or len(block_frames) < 2:
        return max_blocks
    if want <= block_frames[0]:
        return 1
    return min(max_blocks, 1 + -(-(want - block_frames[0]) // block_frames[1]))


async def render_on_replica(server, job: Job) -> tuple[bytes, int, tuple[int, int]]:
    manager, model = server.manager, server.videos.model
    try:
        ticket = manager.enqueue(lambda position: setattr(job, "queue_position", position))
    except QueueFull as e:
        raise ApiError(429, str(e), code="queue_full") from None
    try:
        replica = await ticket.granted
    except BaseException:
        manager.cancel(ticket)
        raise
    request = job.request
    want = request.num_frames
    blocks = blocks_needed(want, model.block_frames, model.max_blocks)
    frames: list[np.ndarray] = []
    enough = asyncio.Event()

    def on_block(out) -> None:
        model.learn(out.block, len(out.frames))
        frames.extend(out.frames)
        job.set_progress(len(frames), want) if want else job.set_progress(out.block + 1, blocks)
        if want is not None and len(frames) >= want:
            enough.set()

    rollout = Rollout(manager, replica, None, server.metrics, inputs=request.inputs(), blocks=blocks,
                      quality=server.config.quality, requested_at=time.monotonic(), pace="asap", on_block=on_block)
    job.set_progress(0, 1)
    rollout.start()
    waiter = asyncio.ensure_future(enough.wait())
    try:
        while not rollout.task.done() and not enough.is_set():
            if job.cancelled:
                raise JobCancelled(job.cancelled)
            await asyncio.wait({rollout.task, waiter}, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        await rollout.stop("cancelled" if job.cancelled else "done")
    if rollout.stop_reason == "error":
        raise RuntimeError("a block failed while rendering the video (see the server log)")
    if want is not None and len(frames) < want:
        raise ApiError(400, f"{want} frames asked for, but the spec {model.name!r} made {len(frames)} in its "
                       f"{model.max_blocks} blocks; ask for fewer or restart fd serve with inputs.num_blocks=N",
                       "seconds", "too_long")
    frames = frames[:want] if want else frames
    data = await asyncio.get_running_loop().run_in_executor(None, mp4_bytes, frames, request.fps)
    h, w = frames[0].shape[:2]
    return data, len(frames), (int(w), int(h))


def mp4_bytes(frames: list[np.ndarray], fps: int, crf: int = 18) -> bytes:
    """[H, W, 3] uint8 frames -> an H.264 (yuv420p) MP4, odd sides padded by edge replication."""
    import av

    buf = io.BytesIO()
    h, w = frames[0].shape[:2]
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = w + w % 2, h + h % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for f in frames:
            if f.shape[:2] != (stream.height, stream.width):
                f = np.pad(f, ((0, stream.height - f.shape[0]), (0, stream.width - f.shape[1]), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
