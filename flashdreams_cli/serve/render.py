"""A video job on a local replica: wait in the shared queue, run the blocks it needs, encode an MP4 in memory.

The job takes a replica through the same FIFO as the live WebSocket sessions (``SessionManager.enqueue``),
runs its session on the replica's own thread (blocks never overlap with another client's), checks between
blocks whether it was cancelled, and gives the replica back however it ends. Frames past the requested count
are trimmed (a spec makes whole blocks).
"""
from __future__ import annotations

import asyncio
import io
from fractions import Fraction

import numpy as np

from .sessions import QueueFull
from .videos import ApiError, Job, JobCancelled


async def render_on_replica(server, job: Job) -> tuple[bytes, int, tuple[int, int]]:
    manager, source, model = server.manager, server.source, server.videos.model
    try:
        ticket = manager.enqueue(lambda position: setattr(job, "queue_position", position))
    except QueueFull as e:
        raise ApiError(429, str(e), code="queue_full") from None
    try:
        replica = await ticket.granted
    except BaseException:
        manager.cancel(ticket)
        raise
    loop = asyncio.get_running_loop()
    session = None
    try:
        request = job.request
        session = await loop.run_in_executor(replica.executor,
                                             lambda: replica.pipeline.open_session(**request.inputs()))
        frames: list[np.ndarray] = []
        want = request.num_frames
        job.set_progress(0, 1)
        while session.block < model.max_blocks and (want is None or len(frames) < want):
            if job.cancelled:
                raise JobCancelled(job.cancelled)
            block = await loop.run_in_executor(replica.executor, lambda: _step(session, source))
            model.learn(session.block - 1, len(block))
            frames.extend(block)
            if want is not None:
                job.set_progress(len(frames), want)
            else:
                job.set_progress(session.block, model.max_blocks)
        if want is not None and len(frames) < want:
            raise ApiError(400, f"{want} frames asked for, but the spec {model.name!r} made {len(frames)} in its "
                           f"{model.max_blocks} blocks; ask for fewer or restart fd serve with inputs.num_blocks=N",
                           "seconds", "too_long")
        frames = frames[:want] if want else frames
        if job.cancelled:
            raise JobCancelled(job.cancelled)
        data = await loop.run_in_executor(None, mp4_bytes, frames, request.fps)
        h, w = frames[0].shape[:2]
        return data, len(frames), (int(w), int(h))
    finally:
        if session is not None:
            await loop.run_in_executor(replica.executor, session.close)
        manager.release(replica)


def _step(session, source) -> list[np.ndarray]:
    from engine.frames import to_uint8_frames
    result = session.step()
    return list(to_uint8_frames(result.outputs[source.frames.node][source.frames.port]))


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
