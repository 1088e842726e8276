"""`fd serve` on Ray Serve: replicas of one spec behind Ray's HTTP proxy, on any number of GPUs and hosts.

Two Serve applications, so that Ray's proxy (longest route-prefix match) does all the routing:

* ``fd`` at ``/`` — deployment ``FdReplica``: each replica loads the spec once (on its own GPU:
  ``num_gpus``), runs the same ``Server`` (session manager, page, ``/ws``, ``/healthz``, ``/metrics``) that
  plain ``fd serve`` runs, and hands Ray its Starlette app as the ingress. A WebSocket is one ASGI call, so a
  live stream stays on the replica that accepted it for its whole life (its KV cache is there). New connections
  go where Ray's router sends them: power-of-two-choices on ongoing requests, i.e. the less loaded replica.
  Autoscaling (``--autoscale MIN:MAX``) follows live and waiting sessions (``session_demand_policy``, fed by
  each replica's ``record_autoscaling_stats``), not CPU.
* ``fd-jobs`` at ``/v1`` — deployment ``FdJobs`` (one small CPU replica): the ``/v1/videos`` job store. It runs
  each job on the least-loaded ``FdReplica`` through a streaming handle call (progress, then the MP4 bytes), and
  when that replica dies mid-job it retries on another (``MAX_ATTEMPTS``). Jobs live here, not on a model
  replica, so they outlive any one of them.

When a replica dies, Ray's proxy ends its WebSockets; ``ReplicaLostMiddleware`` (installed in the proxy by
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, see ``proxy_middlewares``) turns that into a clear
``{"type": "error"}`` message plus close code 1011 for the page. A replica that Ray shuts down on purpose
(scale down, redeploy) tells its clients ``stopped`` with the reason itself. Ray starts a replacement either way.

Only this module imports Ray (``pip install 'fdreams[ray]'``).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from engine.registry import Registry
from engine.runner import read_spec

from .server import ServeConfig, Server
from .videos import ApiError, Job, VideoJobs, VideoRequest, video_routes

log = logging.getLogger("fd.serve.ray")
STREAMS_APP, JOBS_APP = "fd", "fd-jobs"
MAX_ATTEMPTS = 3
PROXY_CALLBACK = "flashdreams_cli.serve.ray_app:proxy_middlewares"
CLOSE_REPLICA_LOST = 1011


def _config(config: dict | None) -> ServeConfig:
    known = ServeConfig.__dataclass_fields__
    return ServeConfig(**{k: tuple(v) if k == "allow_origins" else v for k, v in (config or {}).items()
                          if k in known})


@serve.deployment(name="FdReplica", max_ongoing_requests=16, health_check_period_s=2, health_check_timeout_s=30)
@serve.ingress()
class FdReplica:
    """One replica: one loaded pipeline and the server that streams it (the ingress app is that server's)."""

    async def __init__(self, spec, overrides: list[str] | None = None, config: dict | None = None):
        context = serve.get_replica_context()
        cfg = _config(config)
        cfg.replicas, cfg.replica_name = 1, context.replica_tag
        self.actor_name = context.replica_id.to_full_id_str()
        self.server = Server(read_spec(spec, list(overrides or [])), cfg, Registry.default())
        await self.server.begin_warm_up(self.server.add_replicas())   # ready (and routed to) once warm

    def __serve_build_asgi_app__(self):
        return self.server.app(videos=False)      # /v1 is the fd-jobs app's

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What ``session_demand_policy`` scales on: this replica's live sessions (streams and running jobs),
        the sessions waiting in its queue, and how many sessions it runs at once."""
        m = self.server.manager
        per_pipeline = getattr(m, "max_batch", 1)      # sessions a pipeline steps together (1 without batching)
        return {"fd_sessions": float(len(m.active)), "fd_waiting": float(len(m.waiting)),
                "fd_capacity": float(len(m.replicas) * per_pipeline)}

    def check_health(self) -> None:
        if self.server.warmup_error:
            raise RuntimeError(self.server.warmup_error)

    def describe(self) -> dict:
        return {"replica": self.server.config.replica_name, "actor": self.actor_name,
                "frame_size": self.server.frame_size(), "block_frames": self.server.videos.model.block_frames}

    async def render(self, job_id: str, request: dict):
        """Stream ``{"status", "progress", "queue_position", "replica"}`` updates, then ``{"mp4": bytes, ...}``.
        The job waits in this replica's queue with its live sessions; cancelling the call cancels the job."""
        from .render import render_on_replica

        job = Job(job_id, VideoRequest(**request), int(time.time()))
        task = asyncio.get_running_loop().create_task(render_on_replica(self.server, job))
        replica = self.server.config.replica_name
        try:
            while not task.done():
                yield {"status": job.status, "progress": job.progress, "queue_position": job.queue_position,
                       "replica": replica}
                await asyncio.wait({task}, timeout=0.5)
            data, frames, size = task.result()
        except BaseException:
            job.cancel("the caller went away")
            raise
        yield {"mp4": data, "frames": frames, "size": size, "replica": replica,
               "frame_size": self.server.frame_size(), "block_frames": self.server.videos.model.block_frames}

    async def __del__(self):
        """Ray is shutting this replica down on purpose (scale down, redeploy): say so to every client."""
        await self.server.close_sessions("replica shutting down (scaled down or redeployed); reconnect to "
                                         "continue on another replica")


class JobsHost:
    """What ``VideoJobs`` and the /v1 routes need from a server, without a pipeline: the spec's facts, the config
    (token, limits), and the frame size learned from the model replicas."""

    def __init__(self, spec, config: ServeConfig, render):
        from .sessions import stream_source
        self.config = config
        self.source = stream_source(spec, Registry.default())
        self.warmup_error: str | None = None
        self._frame_size: tuple[int, int] | None = None
        self.videos = VideoJobs(self, render=render)

    def frame_size(self):
        return self._frame_size

    def queue_full(self) -> str | None:
        return None      # Ray's router queues requests for the replicas; each replica's own queue is bounded

    def authorized(self, request) -> bool:
        from .server import token_ok
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.startswith("Bearer ") else request.query_params.get("token")
        return token_ok(self.config.token, given)

    def app(self):
        from starlette.applications import Starlette
        from starlette.middleware import Middleware

        from . import origin
        guard = Middleware(origin.OriginGuard, bound_host=self.config.host,
                           allowed_origins=tuple(self.config.allow_origins))
        return Starlette(routes=video_routes(self, prefix=""), middleware=[guard])   # mounted at /v1 by Ray


@serve.deployment(name="FdJobs", num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class FdJobs:
    """The /v1/videos job store; jobs run on ``FdReplica`` replicas through a handle, retried when one dies."""

    def __init__(self, streams_app: str, spec, overrides: list[str] | None = None,
                 config: dict | None = None):
        self.replicas: DeploymentHandle = serve.get_deployment_handle("FdReplica", app_name=streams_app)
        self.host = JobsHost(read_spec(spec, list(overrides or [])), _config(config), self._render)

    def __serve_build_asgi_app__(self):
        return self.host.app()

    async def _render(self, job: Job):
        model = self.host.videos.model
        last_error: Exception | None = None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            job.attempts = attempt
            job.status, job.progress = "queued", 0
            stream = self.replicas.options(method_name="render", stream=True).remote(job.id, job.request.to_dict())
            try:
                async for update in stream:
                    if job.cancelled:
                        stream.cancel()
                        raise asyncio.CancelledError
                    if "mp4" in update:
                        if update.get("frame_size"):
                            self.host._frame_size = tuple(update["frame_size"])
                        for b, n in enumerate(update.get("block_frames") or []):
                            model.learn(b, n)
                        job.replica = update["replica"]
                        return update["mp4"], update["frames"], tuple(update["size"])
                    job.status, job.replica = update["status"], update["replica"]
                    job.progress, job.queue_position = update["progress"], update["queue_position"]
            except (ApiError, asyncio.CancelledError):
                raise
            except Exception as e:       # the replica died (RayActorError and kin): run the job again elsewhere
                if not _replica_lost(e):
                    raise
                last_error = e
                log.warning("video job %s: replica lost on attempt %d (%s); retrying", job.id, attempt, e)
                await asyncio.sleep(0.5 * attempt)
        raise RuntimeError(f"the job's replica died {MAX_ATTEMPTS} times; last: {last_error}")


def _replica_lost(e: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    return isinstance(e, (RayActorError, ActorDiedError, ActorUnavailableError))


# --------------------------------------------------------------------------- the proxy side
class ReplicaLostMiddleware:
    """In Ray's HTTP proxy: a WebSocket whose replica vanished (the app ended without a close frame after
    accepting) gets an ``error`` message that says so and close code 1011, instead of a bare dropped socket."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            return await self.app(scope, receive, send)
        state = {"accepted": False, "closed": False}

        async def watch(message):
            if message["type"] == "websocket.accept":
                state["accepted"] = True
            elif message["type"] == "websocket.close":
                state["closed"] = True
            await send(message)

        async def watch_receive():
            message = await receive()
            if message["type"] == "websocket.disconnect":
                state["closed"] = True     # the client left: nobody to tell
            return message

        error = None
        try:
            await self.app(scope, watch_receive, watch)
        except Exception as e:  # noqa: BLE001 - reported to the client below
            error = e
        if state["accepted"] and not state["closed"]:
            reason = "replica lost: the server process streaming this session died; reconnect for a new session"
            try:
                await send({"type": "websocket.send", "text": json.dumps({"type": "error", "message": reason,
                                                                          "code": "replica_lost"})})
                await send({"type": "websocket.close", "code": CLOSE_REPLICA_LOST, "reason": "replica lost"})
            except Exception:  # noqa: BLE001 - the socket is gone as well
                pass
        elif error is not None:
            raise error


def proxy_middlewares() -> list:
    """``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` target: the middlewares Ray's proxy wraps its app in."""
    from starlette.middleware import Middleware
    return [Middleware(ReplicaLostMiddleware)]


# --------------------------------------------------------------------------- autoscaling
def session_demand_policy(ctx) -> tuple[int, dict]:
    """Ray Serve autoscaling policy: enough replicas for the live and waiting sessions (each replica reports
    them with ``record_autoscaling_stats``), plus requests queued in Ray's router before reaching any replica.
    CPU load plays no part. Ray applies the min/max bounds and the up/down-scale delays around it."""
    metrics = ctx.aggregated_metrics or {}
    live = sum((metrics.get("fd_sessions") or {}).values())
    waiting = sum((metrics.get("fd_waiting") or {}).values()) + float(ctx.total_queued_requests or 0)
    capacity = max((metrics.get("fd_capacity") or {}).values(), default=1.0) or 1.0
    if not metrics.get("fd_sessions"):        # no replica has reported yet: keep what there is
        return ctx.target_num_replicas, {}
    return math.ceil((live + waiting) / capacity), {}


# --------------------------------------------------------------------------- building and running
def deployment_options(replicas: int = 1, autoscale: tuple[int, int] | None = None, num_gpus: float = 1.0,
                       num_cpus: float = 1.0, placement_bundles: list[dict] | None = None) -> dict:
    """``FdReplica.options(...)``: a fixed count or an autoscaling range; ``placement_bundles`` for a
    context-parallel spec that needs several GPUs of one host (``[{"GPU": 1, "CPU": 1}] * 2``, STRICT_PACK)."""
    actor: dict[str, Any] = {"num_gpus": num_gpus, "num_cpus": num_cpus}
    opts: dict[str, Any] = {"ray_actor_options": actor}
    if autoscale is not None:
        lo, hi = autoscale
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                      "upscale_delay_s": 5, "downscale_delay_s": 120,
                                      "policy": {"policy_function": f"{__name__}:session_demand_policy"}}
    else:
        opts["num_replicas"] = replicas
    if placement_bundles:      # the replica actor takes the first bundle; the rest wait for its rank workers
        actor["num_gpus"] = placement_bundles[0].get("GPU", 0)
        opts["placement_group_bundles"] = placement_bundles
        opts["placement_group_strategy"] = "STRICT_PACK"
    return opts


def streams_app(args: dict):
    """Serve application builder for ``fd`` (``serve run flashdreams_cli.serve.ray_app:streams_app spec=...``)."""
    opts = deployment_options(**_builder_options(args))
    return FdReplica.options(**opts).bind(args["spec"], list(args.get("overrides") or []), args.get("config"))


def jobs_app(args: dict):
    """Serve application builder for ``fd-jobs`` (mounted at /v1; finds ``fd``'s replicas by name)."""
    return FdJobs.bind(args.get("streams_app", STREAMS_APP), args["spec"], list(args.get("overrides") or []),
                       args.get("config"))


def _builder_options(args: dict) -> dict:
    out: dict[str, Any] = {}
    if args.get("autoscale"):
        lo, hi = (int(x) for x in str(args["autoscale"]).split(":"))
        out["autoscale"] = (lo, hi)
    for k in ("replicas",):
        if k in args:
            out[k] = int(args[k])
    for k in ("num_gpus", "num_cpus"):
        if k in args:
            out[k] = float(args[k])
    if args.get("placement_bundles"):
        out["placement_bundles"] = list(args["placement_bundles"])
    return out


def run(spec, overrides: list[str], config: ServeConfig, *, replicas: int = 1,
        autoscale: tuple[int, int] | None = None, num_gpus: float = 1.0, num_cpus: float = 1.0,
        placement_bundles: list[dict] | None = None, blocking: bool = False) -> None:
    """Deploy both applications on the connected Ray cluster (``ray.init`` first) and, with ``blocking``, wait.
    ``spec`` is a reference (packaged name or a path every node can read) or a parsed ``Spec`` (pickled to the
    replicas). The proxy listens on ``config.host:config.port``."""
    cfg = {k: getattr(config, k) for k in ("token", "max_queue", "idle_timeout", "quality", "outbox_frames",
                                           "auth_timeout", "transport_max_bytes", "messages_per_s",
                                           "message_burst", "video_dir", "max_video_jobs", "host")}
    cfg["allow_origins"] = list(config.allow_origins)
    serve.start(http_options={"host": config.host, "port": config.port})
    opts = deployment_options(replicas, autoscale, num_gpus, num_cpus, placement_bundles)
    serve.run(FdReplica.options(**opts).bind(spec, list(overrides), cfg), name=STREAMS_APP, route_prefix="/",
              blocking=False)
    serve.run(FdJobs.bind(STREAMS_APP, spec, list(overrides), cfg), name=JOBS_APP, route_prefix="/v1",
              blocking=blocking)
