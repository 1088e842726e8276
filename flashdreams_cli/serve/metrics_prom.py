"""`/metrics` in the Prometheus text format: what a scraper (Prometheus, Ray's dashboard, Grafana) reads.

The numbers are read from the live server at scrape time by a custom collector on a registry of the server's
own (no process-global registry: two servers in one process, as in the tests, never mix their numbers, and a
session's series vanish with the session instead of piling up as stale label sets).

Per session (label ``session``, the connection's current rollout id, and ``replica``): frames per second
generated for the client over the last ``FPS_WINDOW_S`` seconds, the last block's compute time, frames sent and
frames dropped for it (latest-wins outbox overflow). Server-wide: queue depth, live sessions, connections,
totals, block/encode time quantiles, video jobs per status, and, on CUDA, GPU memory per device.
"""
from __future__ import annotations

import collections
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .sessions import Outbox

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
FPS_WINDOW_S = 2.0


class MeteredOutbox(Outbox):
    """A connection's outbox that also keeps what ``/metrics`` reports per session: when frames were pushed
    (fps over a sliding window), and the compute time of the last block (read from the ``block`` message the
    rollout sends with each block)."""

    def __init__(self, max_frames: int = 2, max_control: int = 256):
        super().__init__(max_frames, max_control)
        self.pushed: collections.deque[float] = collections.deque(maxlen=4096)
        self.frames_pushed = 0
        self.block_ms: float | None = None

    def push_frame(self, data: bytes) -> bool:
        if not self.closed:
            self.pushed.append(time.monotonic())
            self.frames_pushed += 1
        return super().push_frame(data)

    def push_json(self, msg: dict, droppable: bool = False) -> None:
        if msg.get("type") == "block" and isinstance(msg.get("ms"), (int, float)):
            self.block_ms = float(msg["ms"])
        super().push_json(msg, droppable)

    def fps(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        while self.pushed and now - self.pushed[0] > FPS_WINDOW_S:
            self.pushed.popleft()
        return len(self.pushed) / FPS_WINDOW_S


class ServeCollector:
    """Builds the metric families from a ``Server`` each time it is scraped."""

    def __init__(self, server):
        self.server = server

    def collect(self):
        s = self.server
        m = s.metrics
        labels = {"spec": s.source.spec.name}
        if s.config.replica_name:
            labels["replica_id"] = s.config.replica_name
        names, values = list(labels), list(labels.values())

        def gauge(name, doc, value, extra=None):
            g = GaugeMetricFamily(name, doc, labels=names + list(extra or {}))
            g.add_metric(values + list((extra or {}).values()), value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, value)
            return c

        yield gauge("fd_serve_ready", "1 once a replica has warmed up", 1.0 if s.ready else 0.0)
        yield gauge("fd_serve_queue_depth", "clients and video jobs waiting for a replica", len(s.manager.waiting))
        yield gauge("fd_serve_replicas", "pipeline replicas in this server", len(s.manager.replicas))
        yield gauge("fd_serve_connections", "open WebSocket connections", len(s.connections))
        yield gauge("fd_serve_sessions_active", "live streaming sessions", len(s.manager.active))
        yield counter("fd_serve_blocks", "blocks generated for live sessions", m.blocks_served)
        yield counter("fd_serve_frames_sent", "frames generated for live sessions", m.frames_sent)
        yield counter("fd_serve_frames_dropped", "frames a client never got (its outbox overflowed)",
                      m.frames_dropped)
        yield counter("fd_serve_sessions_started", "live sessions started", m.sessions_started)
        for name, series, doc in (("fd_serve_block_ms", m.block_ms, "block compute time (ms), recent blocks"),
                                  ("fd_serve_encode_ms", m.encode_ms, "JPEG encode time per block (ms)"),
                                  ("fd_serve_first_frame_ms", m.first_frame_ms, "start to first frame (ms)")):
            g = GaugeMetricFamily(name, doc, labels=names + ["stat"])
            summary = m._summary(series)
            for stat in ("last", "median", "p90", "max"):
                if stat in summary:
                    g.add_metric(values + [stat], summary[stat])
            yield g

        fps = GaugeMetricFamily("fd_serve_session_fps", f"frames/s generated for a session (last {FPS_WINDOW_S:g} s)",
                                labels=names + ["session", "replica"])
        block = GaugeMetricFamily("fd_serve_session_block_ms", "a session's last block compute time (ms)",
                                  labels=names + ["session", "replica"])
        position = GaugeMetricFamily("fd_serve_session_block", "a session's current block",
                                     labels=names + ["session", "replica"])
        sent = CounterMetricFamily("fd_serve_session_frames", "frames generated for a session's connection",
                                   labels=names + ["session", "replica"])
        dropped = CounterMetricFamily("fd_serve_session_frames_dropped", "frames a session's client never got",
                                      labels=names + ["session", "replica"])
        for c in list(s.connections):
            r = c.rollout
            if r is None:
                continue
            key = values + [str(r.session_id), str(r.replica.index)]
            fps.add_metric(key, c.outbox.fps())
            if c.outbox.block_ms is not None:
                block.add_metric(key, c.outbox.block_ms)
            position.add_metric(key, r.session.block if r.session is not None else 0)
            sent.add_metric(key, c.outbox.frames_pushed)
            dropped.add_metric(key, c.outbox.dropped)
        yield from (fps, block, position, sent, dropped)

        jobs = GaugeMetricFamily("fd_serve_video_jobs", "/v1/videos jobs by status", labels=names + ["status"])
        for status, n in s.videos.counts().items():
            jobs.add_metric(values + [status], n)
        yield jobs
        yield from gpu_memory(names, values)


def gpu_memory(names, values):
    """Allocated and reserved CUDA memory per device (no samples on a CPU-only host)."""
    alloc = GaugeMetricFamily("fd_serve_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated per device",
                              labels=names + ["device"])
    reserved = GaugeMetricFamily("fd_serve_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved per device",
                                 labels=names + ["device"])
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            alloc.add_metric(values + [f"cuda:{i}"], torch.cuda.memory_allocated(i))
            reserved.add_metric(values + [f"cuda:{i}"], torch.cuda.memory_reserved(i))
    yield alloc
    yield reserved


def prometheus_text(server) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServeCollector(server))
    return generate_latest(registry)
