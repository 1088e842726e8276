"""`/metrics` in the Prometheus text format: what a scraper (Prometheus, Ray's dashboard, Grafana) reads.

The numbers are read from the live server at scrape time by a custom collector on a registry of the server's
own (no process-global registry: two servers in one process, as in the tests, never mix their numbers, and a
session's series vanish with the session instead of piling up as stale label sets).

Per session (labels ``session``, ``replica``, ``pace``; video jobs are sessions with pace ``asap``): frames per
second generated recently, the last block's compute time (shared by its batch), frames sent and frames dropped
for it (latest-wins outbox overflow), all from ``SessionManager.stats()``. Per replica: live sessions, free
slots, batches run, the last batch's size, and GPU memory. Server-wide: queue depth, live sessions,
connections, totals, block/encode time quantiles, video jobs per status.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


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

        stats = s.manager.stats()
        yield gauge("fd_serve_ready", "1 once a replica has warmed up", 1.0 if s.ready else 0.0)
        yield gauge("fd_serve_queue_depth", "clients and video jobs waiting for a slot", stats["queue_depth"])
        yield gauge("fd_serve_replicas", "pipeline replicas in this server", len(s.manager.replicas))
        yield gauge("fd_serve_max_batch", "sessions a replica steps together at most", stats["max_batch"])
        yield gauge("fd_serve_connections", "open WebSocket connections", len(s.connections))
        yield gauge("fd_serve_sessions_active", "live sessions (streams and running video jobs)",
                    len(stats["sessions"]))
        yield counter("fd_serve_blocks", "blocks generated", m.blocks_served)
        yield counter("fd_serve_frames_sent", "frames generated for live streams", m.frames_sent)
        yield counter("fd_serve_frames_dropped", "frames a client never got (its outbox overflowed)",
                      m.frames_dropped)
        yield counter("fd_serve_sessions_started", "sessions started", m.sessions_started)
        for name, series, doc in (("fd_serve_block_ms", m.block_ms, "block compute time (ms), recent blocks"),
                                  ("fd_serve_encode_ms", m.encode_ms, "JPEG encode time per block (ms)"),
                                  ("fd_serve_first_frame_ms", m.first_frame_ms, "start to first frame (ms)")):
            g = GaugeMetricFamily(name, doc, labels=names + ["stat"])
            summary = m._summary(series)
            for stat in ("last", "median", "p90", "max"):
                if stat in summary:
                    g.add_metric(values + [stat], summary[stat])
            yield g

        per = names + ["session", "replica", "pace"]
        fps = GaugeMetricFamily("fd_serve_session_fps", "frames/s generated for a session (recent)", labels=per)
        block = GaugeMetricFamily("fd_serve_session_block_ms", "a session's last block compute time (ms)",
                                  labels=per)
        position = GaugeMetricFamily("fd_serve_session_block", "a session's current block", labels=per)
        sent = CounterMetricFamily("fd_serve_session_frames", "frames generated for a session's client",
                                   labels=per)
        dropped = CounterMetricFamily("fd_serve_session_frames_dropped", "frames a session's client never got",
                                      labels=per)
        for st in stats["sessions"]:
            key = values + [str(st["session"]), str(st["replica"]), st["pace"]]
            if st["fps"] is not None:
                fps.add_metric(key, st["fps"])
            if st["block_ms"] is not None:
                block.add_metric(key, st["block_ms"])
            position.add_metric(key, st["block"])
            sent.add_metric(key, st["frames_sent"])
            dropped.add_metric(key, st["frames_dropped"])
        yield from (fps, block, position, sent, dropped)

        rep = names + ["replica"]
        families = {k: GaugeMetricFamily(f"fd_serve_replica_{k}", doc, labels=rep) for k, doc in (
            ("sessions", "sessions on a replica"), ("free_slots", "sessions a replica can still take"),
            ("batch_size_last", "sessions in a replica's last batch"))}
        batches = CounterMetricFamily("fd_serve_replica_batches", "batches a replica has run", labels=rep)
        alloc = GaugeMetricFamily("fd_serve_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated per replica",
                                  labels=rep)
        reserved = GaugeMetricFamily("fd_serve_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved per replica",
                                     labels=rep)
        for r in stats["replicas"]:
            key = values + [str(r["index"])]
            for k, fam in families.items():
                fam.add_metric(key, r[k])
            batches.add_metric(key, r["batches"])
            if r.get("gpu_memory_allocated_bytes") is not None:      # None on a CPU replica
                alloc.add_metric(key, r["gpu_memory_allocated_bytes"])
            if r.get("gpu_memory_reserved_bytes") is not None:
                reserved.add_metric(key, r["gpu_memory_reserved_bytes"])
        yield from (*families.values(), batches, alloc, reserved)

        jobs = GaugeMetricFamily("fd_serve_video_jobs", "/v1/videos jobs by status", labels=names + ["status"])
        for status, n in s.videos.counts().items():
            jobs.add_metric(values + [status], n)
        yield jobs


def prometheus_text(server) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServeCollector(server))
    return generate_latest(registry)
