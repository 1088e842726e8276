"""The ASGI app (Starlette): the page, ``/ws`` (control + frames), ``/healthz``, ``/metrics``, ``/v1/...``.

One codebase for both ways of running it: ``Server.start()`` serves the app with uvicorn on one host, and
``ray_app.py`` hands the same app to Ray Serve as a replica's ingress (Ray's proxy speaks to it over ASGI,
WebSockets included). One ``Connection`` per WebSocket: it validates messages (protocol.py), holds the
client's place in the queue or its running ``Rollout`` (sessions.py), and runs a sender task that drains the
client's bounded outbox, so a slow reader only ever costs dropped frames. The server listens at once but
grants sessions only after a replica has warmed up (one block run and discarded); /healthz says 503 until then.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from engine.registry import Registry
from engine.spec import Spec

from . import origin, protocol
from .metrics_prom import PROMETHEUS_TEXT, prometheus_text
from .protocol import ProtocolError
from .render import render_on_replica
from .sessions import Metrics, Outbox, QueueFull, Replica, Rollout, SessionManager, Ticket, stream_source
from .videos import VideoJobs, video_routes

log = logging.getLogger("fd.serve")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
CLOSE_UNAUTHORIZED = 4401
CLOSE_IDLE = 4408
CLOSE_OVERFLOW = 4429
CLOSE_GOING_AWAY = 1001


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8188
    token: str | None = None
    max_queue: int = 8
    idle_timeout: float = 60.0       # seconds a paused/finished session or a session-less connection may sit
    replicas: int = 1
    max_batch: int = 8               # sessions a replica steps together (one forward per denoising step)
    pace: str = "realtime"           # default pace of a session: realtime (the spec's fps) or asap
    quality: int = 85                # default JPEG quality (a client may ask for another)
    outbox_frames: int = 2           # frames buffered per client before the oldest is dropped
    auth_timeout: float = 10.0       # seconds to send {type: auth} when the URL carried no token
    transport_max_bytes: int = 1 << 20   # larger WebSocket messages close the connection
    allow_origins: tuple[str, ...] = ()  # page origins besides the server's own that may connect (origin.py)
    messages_per_s: float = 50.0     # sustained client messages per connection (the page sends ~1-30/s)
    message_burst: int = 100         # ... and how many may arrive at once before the rate applies
    video_dir: str | None = None     # where /v1/videos MP4s are kept (default: a temporary directory)
    max_video_jobs: int = 32         # video jobs kept (finished ones are evicted oldest first)
    replica_name: str | None = None  # shown in `started` messages and /healthz (Ray mode: the Ray replica id)


class Server:
    def __init__(self, spec: Spec, config: ServeConfig | None = None, registry: Registry | None = None):
        self.config = config or ServeConfig()
        self.registry = registry or Registry.default()
        self.source = stream_source(spec, self.registry)
        self.manager = SessionManager(self.config.max_queue, max_batch=self.config.max_batch, pace=self.config.pace)
        self.metrics = Metrics()
        self.connections: set[Connection] = set()
        self.videos = VideoJobs(self, render=lambda job: render_on_replica(self, job))
        self.ready = False
        self.warmup_error: str | None = None
        self._uvicorn = None
        self._serving: asyncio.Task | None = None
        self._warmup_task: asyncio.Task | None = None
        self.port: int | None = None

    # ------------------------------------------------------------------ lifecycle
    def app(self, videos: bool = True) -> Starlette:
        """The ASGI app; ``videos=False`` leaves /v1 out (under Ray a separate job-store app serves it)."""
        routes = [Route("/", self._page), Route("/app.js", self._page), Route("/style.css", self._page),
                  Route("/favicon.ico", self._no_icon), WebSocketRoute("/ws", self._ws),
                  Route("/healthz", self._healthz), Route("/metrics", self._metrics),
                  Route("/metrics.json", self._metrics_json), *(video_routes(self) if videos else [])]
        guard = Middleware(origin.OriginGuard, bound_host=self.config.host,
                           allowed_origins=tuple(self.config.allow_origins))
        return Starlette(routes=routes, middleware=[guard])

    def add_replicas(self) -> list[Replica]:
        replicas = [Replica(i, self.source, self.registry) for i in range(self.config.replicas)]
        for r in replicas:
            self.manager.add_replica(r, ready=False)
        return replicas

    async def start(self, warm: bool = True) -> int:
        """Listen (port 0 picks a free one; returns the port) and warm replicas up in the background."""
        import uvicorn

        replicas = self.add_replicas()
        host = self.config.host
        sock = socket.create_server((host, self.config.port),
                                    family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(self.app(), lifespan="off", log_level="warning", access_log=False,
                                ws_max_size=self.config.transport_max_bytes, ws_ping_interval=20.0,
                                ws_per_message_deflate=False,   # JPEGs do not deflate: it only costs CPU
                                timeout_graceful_shutdown=5)
        self._uvicorn = _Uvicorn(config)
        self._serving = asyncio.get_running_loop().create_task(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._serving.done():
                self._serving.result()
                raise OSError(f"uvicorn did not start on {host}:{self.port}")
            await asyncio.sleep(0.005)
        self._warmup_task = self.begin_warm_up(replicas)
        if warm:
            await asyncio.shield(self._warmup_task)
        return self.port

    def begin_warm_up(self, replicas: list[Replica]) -> asyncio.Task:
        self._warmup_task = asyncio.get_running_loop().create_task(self._warm_up(replicas))
        return self._warmup_task

    async def _warm_up(self, replicas: list[Replica]) -> None:
        loop = asyncio.get_running_loop()
        try:
            for r in replicas:
                await loop.run_in_executor(r.executor, r.warm_up)
                self.manager.make_ready(r)
            self.ready = True
        except Exception as e:
            self.warmup_error = f"warm-up failed: {e}"
            log.exception("warm-up failed")
            for c in list(self.connections):
                c.send(protocol.error(self.warmup_error))
            raise

    async def close_sessions(self, reason: str = "server shutting down") -> None:
        """Tell every client why its stream ends (a clear ``stopped`` message), then close its socket."""
        await asyncio.gather(*(c.close(CLOSE_GOING_AWAY, reason) for c in list(self.connections)),
                             return_exceptions=True)
        await self.videos.shutdown()

    async def stop(self) -> None:
        await self.close_sessions()
        if self._warmup_task is not None:
            with contextlib.suppress(BaseException):
                await self._warmup_task
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            with contextlib.suppress(BaseException):
                await self._serving
        for r in self.manager.replicas:
            await asyncio.get_running_loop().run_in_executor(None, r.shutdown)

    # ------------------------------------------------------------------ auth
    def _token_ok(self, given: str | None) -> bool:
        return token_ok(self.config.token, given)

    def request_token(self, request) -> str | None:
        """A Bearer header (the OpenAI SDK's api_key) or ``?token=`` (the page's URL)."""
        auth = request.headers.get("authorization", "")
        if auth.startswith("Bearer "):
            return auth[7:]
        return request.query_params.get("token")

    def authorized(self, request) -> bool:
        return self._token_ok(self.request_token(request))

    # ------------------------------------------------------------------ HTTP
    async def _page(self, request: Request) -> Response:
        name = {"/": "index.html"}.get(request.url.path, request.url.path.lstrip("/"))
        types = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
                 "css": "text/css; charset=utf-8"}
        body = resources.files(__package__).joinpath("page", name).read_bytes()
        return Response(body, media_type=types[name.rsplit(".", 1)[1]],
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    async def _no_icon(self, request: Request) -> Response:
        return Response(status_code=204)

    def health(self) -> tuple[int, dict]:
        status = "ok" if self.ready else ("failed" if self.warmup_error else "warming")
        body = {"status": status, "spec": self.source.spec.name}
        if self.config.replica_name:
            body["replica"] = self.config.replica_name
        if self.warmup_error:
            body["error"] = self.warmup_error
        return (200 if self.ready else 503), body

    async def _healthz(self, request: Request) -> Response:
        status, body = self.health()
        return JSONResponse(body, status_code=status)

    async def _metrics(self, request: Request) -> Response:
        """Prometheus text format; ``Accept: application/json`` (or /metrics.json) gives the JSON snapshot."""
        if not self.authorized(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse(self.metrics_snapshot())
        return Response(prometheus_text(self), media_type=PROMETHEUS_TEXT)

    async def _metrics_json(self, request: Request) -> Response:
        if not self.authorized(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        return JSONResponse(self.metrics_snapshot())

    def metrics_snapshot(self) -> dict:
        snap = self.metrics.snapshot()
        stats = self.manager.stats()
        snap.update(ready=self.ready, spec=self.source.spec.name, replicas=len(self.manager.replicas),
                    connections=len(self.connections), queue_length=stats["queue_depth"],
                    active_sessions=stats["sessions"], replica_stats=stats["replicas"],
                    video_jobs=self.videos.counts())
        snap["active_session"] = snap["active_sessions"][0]["session"] if snap["active_sessions"] else None
        return snap

    def hello(self, authorized: bool) -> dict:
        """The page's first message; ``prompt_switch`` is what a prompt switch does to the cache (the spec's
        ``ar.sampler`` choice, set with e.g. ``fd serve spec nodes.sampler.params.prompt_switch=recache``)."""
        if not authorized:   # nothing about the spec before the token is shown
            return {"type": "hello", "protocol": protocol.PROTOCOL_VERSION, "auth_required": True}
        spec = self.source.spec
        size = self.frame_size()
        hello = {"type": "hello", "protocol": protocol.PROTOCOL_VERSION, "spec": spec.name,
                 "description": spec.description, "has_prompt": "prompt" in spec.inputs,
                 "prompt": spec.inputs.get("prompt") if isinstance(spec.inputs.get("prompt"), str) else None,
                 "has_seed": "seed" in spec.inputs, "seed": spec.inputs.get("seed"),
                 "controls": self.source.controls, "fps": self.source.fps, "max_blocks": self.source.max_blocks,
                 "frame_size": list(size) if size else None, "ready": self.ready,
                 "prompt_switch": prompt_switch_mode(spec), "auth_required": not authorized}
        if self.config.replica_name:
            hello["replica_id"] = self.config.replica_name
        return hello

    def queue_full(self) -> str | None:
        """Why a new session or job would be refused now (no free replica and the wait queue full), else None."""
        m = self.manager
        if not m.free and len(m.waiting) >= m.max_queue:
            return f"server busy: {len(m.waiting)} client(s) already waiting (max {m.max_queue})"
        return None

    def frame_size(self) -> tuple[int, int] | None:
        return next((r.frame_size for r in self.manager.replicas if r.frame_size), None)

    async def _ws(self, websocket: WebSocket) -> None:
        given = self.request_token(websocket)
        if given is not None and not self._token_ok(given):
            await origin.refuse(websocket.scope, websocket.send, 401, {"error": "unauthorized"})
            return
        await websocket.accept()
        conn = Connection(self, websocket, authorized=self._token_ok(given))
        self.connections.add(conn)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)


class Connection:
    """One WebSocket client: its queue ticket or rollout, its outbox and sender, its idle clock."""

    def __init__(self, server: Server, ws: WebSocket, authorized: bool):
        self.server, self.ws, self.authorized = server, ws, authorized
        self.config = server.config
        self.outbox = Outbox(self.config.outbox_frames)
        self.closed = False
        self.ticket: Ticket | None = None
        self.rollout: Rollout | None = None
        self._starting: asyncio.Task | None = None
        self.last_message = time.monotonic()
        self.connected_at = time.monotonic()
        self._tokens, self._refilled = float(self.config.message_burst), time.monotonic()
        self._told_rate = 0.0

    def _within_rate(self) -> bool:
        """A token bucket per connection: a flood costs the flooder dropped messages, not the server's loop."""
        now = time.monotonic()
        cap = float(self.config.message_burst)
        self._tokens = min(cap, self._tokens + (now - self._refilled) * self.config.messages_per_s)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        if now - self._told_rate > 1.0:        # one error a second, not one per dropped message
            self._told_rate = now
            self.send(protocol.error(f"rate limit: at most {self.config.messages_per_s:g} messages/s; "
                                     "messages were dropped"))
        return False

    def send(self, msg: dict) -> None:
        self.outbox.push_json(msg)

    async def serve(self) -> None:
        self.send(self.server.hello(self.authorized))
        sender = asyncio.create_task(self._sender())
        watchdog = asyncio.create_task(self._watchdog())
        try:
            while not self.closed:
                raw = await self.ws.receive()
                if raw["type"] == "websocket.disconnect":
                    self.closed = True
                    break
                if not self._within_rate():
                    continue
                try:
                    text = raw.get("text")
                    msg = protocol.parse_message(text if text is not None else bytes(raw.get("bytes") or b""))
                    if msg["type"] != "ping":     # the page pings every 2 s: that is not a person using it
                        self.last_message = time.monotonic()
                    if not self.authorized:
                        await self._authorize(msg)
                        continue
                    await self._dispatch(msg)
                except ProtocolError as e:
                    self.send(protocol.error(str(e)))
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass          # the socket went away under us (a close while receiving)
        finally:
            self.closed = True
            self.outbox.close()          # nobody to send to any more: drop what is queued
            await self._end_session("disconnected")
            for t in (sender, watchdog):
                t.cancel()
            await asyncio.gather(sender, watchdog, return_exceptions=True)

    async def close(self, code: int, message: str) -> None:
        """End the session with a ``stopped`` message that says why (e.g. the replica is shutting down), then
        close the socket with ``code`` and that reason."""
        await self._end_session(message)
        await self._flush()
        await self._close_socket(code, message)

    async def _close_socket(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, reason=reason)

    async def _authorize(self, msg: dict) -> None:
        if msg["type"] == "auth" and self.server._token_ok(msg["token"]):
            self.authorized = True
            self.send({"type": "auth", "ok": True})
            self.send(self.server.hello(True))
            return
        self.send(protocol.error("unauthorized: the first message must be {type: auth, token} with a valid token"))
        await self._flush()
        await self._close_socket(CLOSE_UNAUTHORIZED, "unauthorized")

    async def _flush(self, timeout: float = 1.0) -> None:
        end = time.monotonic() + timeout
        while len(self.outbox) and time.monotonic() < end:
            await asyncio.sleep(0.005)

    async def _sender(self) -> None:
        try:
            while True:
                item = await self.outbox.get()
                if item is None:
                    if self.outbox.overflowed:
                        await self._close_socket(CLOSE_OVERFLOW, "client not reading")
                    return
                if isinstance(item, bytes):
                    await self.ws.send_bytes(item)
                else:
                    await self.ws.send_text(json.dumps(item))
        except (OSError, RuntimeError, WebSocketDisconnect, asyncio.CancelledError):
            return          # uvicorn raises ClientDisconnected (an OSError) once the peer is gone

    async def _watchdog(self) -> None:
        """Idle timeout: a paused or finished session, or a connection that neither waits nor streams."""
        limit = self.config.idle_timeout
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            now = time.monotonic()
            if not self.authorized and now - self.connected_at > self.config.auth_timeout:
                self.send(protocol.error("unauthorized: no auth message in time"))
                await self._flush()
                await self._close_socket(CLOSE_UNAUTHORIZED, "unauthorized")
                return
            quiet = now - self.last_message
            r = self.rollout
            if r is not None and r.idle_since is not None and now - r.idle_since > limit and quiet > limit:
                await self._end_session("idle")
            elif r is None and self.ticket is None and self._starting is None and quiet > limit:
                self.send({"type": "stopped", "session": None, "reason": "idle"})
                await self._flush()
                await self._close_socket(CLOSE_IDLE, "idle")
                return

    # ------------------------------------------------------------------ messages
    async def _dispatch(self, msg: dict) -> None:
        kind = msg["type"]
        if kind == "ping":
            self.send({"type": "pong", "t": msg.get("t"), "server_t": time.time() * 1e3})
        elif kind == "auth":
            self.send({"type": "auth", "ok": True})
        elif kind == "start":
            self._start(msg)
        elif kind == "stop":
            if self.rollout is None and self.ticket is None and self._starting is None:
                self.send(protocol.error("no session to stop"))
            else:
                await self._end_session("stopped")
        elif self.rollout is None:
            self.send(protocol.error(f"{kind}: no active session (send start first)"))
        elif kind in ("prompt",) + protocol.CONTROL_TYPES:
            spec_inputs = self.server.source.spec.inputs
            if kind not in spec_inputs:
                have = ", ".join(self.server.source.controls) or "none"
                self.send(protocol.error(f"{kind}: the spec {self.server.source.spec.name!r} has no {kind} input "
                                         f"(controls: {have})"))
                return
            self.rollout.post(kind, msg["prompt"] if kind == "prompt" else msg["value"])
        elif kind == "branch":
            self.rollout.post(kind, msg)
        else:  # pause, resume, reset, save
            self.rollout.post(kind)

    def _start(self, msg: dict) -> None:
        if self.rollout is not None or self.ticket is not None or self._starting is not None:
            self.send(protocol.error("start: a session is already running or queued (send stop or reset)"))
            return
        if self.server.warmup_error:
            self.send(protocol.error(self.server.warmup_error))
            return
        source = self.server.source
        inputs: dict[str, Any] = {}
        for name in ("prompt", "seed"):
            if name in msg:
                if name not in source.spec.inputs:
                    self.send(protocol.error(f"start: the spec {source.spec.name!r} has no {name} input"))
                    return
                inputs[name] = msg[name]
        opts = msg.get("options", {})
        blocks = opts.get("blocks", source.max_blocks)
        if blocks > source.max_blocks:
            self.send(protocol.error(f"start: blocks {blocks} is more than the spec's num_blocks "
                                     f"{source.max_blocks} (restart fd serve with inputs.num_blocks=N for more)"))
            return
        requested_at = time.monotonic()
        try:
            self.ticket = self.server.manager.enqueue(self._on_position)
        except QueueFull as e:
            self.send(protocol.error(str(e)))
            return
        self._starting = asyncio.create_task(self._await_replica(
            self.ticket, inputs, blocks, opts.get("quality", self.config.quality), requested_at, opts.get("pace")))

    def _on_position(self, position: int) -> None:
        self.send({"type": "queue", "position": position})

    async def _await_replica(self, ticket: Ticket, inputs, blocks, quality, requested_at, pace=None) -> None:
        try:
            replica = await ticket.granted
        except asyncio.CancelledError:
            return
        finally:
            self._starting = None
            self.ticket = None
        rollout = Rollout(self.server.manager, replica, self.outbox, self.server.metrics, inputs=inputs,
                          blocks=blocks, quality=quality, requested_at=requested_at, pace=pace)
        rollout.on_end = self._on_rollout_end
        self.rollout = rollout
        rollout.start()

    def _on_rollout_end(self, rollout: Rollout) -> None:
        if self.rollout is rollout:
            self.rollout = None

    async def _end_session(self, reason: str) -> None:
        """Leave the queue, or stop the rollout (after its block in flight) and free the replica."""
        if self.ticket is not None:
            ticket, self.ticket = self.ticket, None
            self.server.manager.cancel(ticket)
            self.send({"type": "stopped", "session": None, "reason": reason})
        if self._starting is not None:
            self._starting.cancel()
            self._starting = None
        if self.rollout is not None:
            await self.rollout.stop(reason)


# --------------------------------------------------------------------------- running it
def _uvicorn_server_class():
    import uvicorn

    class Uvicorn(uvicorn.Server):
        """uvicorn without its signal handlers: Ctrl-C stays a KeyboardInterrupt for whoever runs the loop
        (``fd serve`` then stops the server itself: clients get a ``stopped`` message with the reason)."""

        def capture_signals(self):
            return contextlib.nullcontext()
    return Uvicorn


def _Uvicorn(config):
    return _uvicorn_server_class()(config)


class BackgroundServer:
    """A server on its own event loop in a daemon thread: for synchronous callers (browser tests, notebooks).

        with BackgroundServer(spec, ServeConfig(port=0)) as bg:
            print(bg.url)
    """

    def __init__(self, spec: Spec, config: ServeConfig | None = None, registry: Registry | None = None):
        self.server = Server(spec, config, registry)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fd-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.server.config.host}:{self.server.port}"

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=120)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


async def serve_forever(spec: Spec, config: ServeConfig, registry: Registry | None = None,
                        on_listening=None) -> None:
    server = Server(spec, config, registry)
    await server.start(warm=False)
    if on_listening is not None:
        on_listening(server)
    try:
        await server._warmup_task
        await asyncio.shield(server._serving)    # until Ctrl-C (stop() below then ends uvicorn in order)
    finally:
        await server.stop()


def token_ok(want: str | None, given: str | None) -> bool:
    """No token configured, or the same one (constant-time compare)."""
    return want is None or (given is not None and hmac.compare_digest(given.encode(), want.encode()))


def prompt_switch_mode(spec) -> str | None:
    """The ``prompt_switch`` of the spec's AR sampler (default keep), or None without one."""
    for ns in spec.nodes.values():
        if ns.type == "ar.sampler":
            return (ns.params or {}).get("prompt_switch", "keep")
    return None
