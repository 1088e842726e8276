"""The aiohttp app: the page, ``/ws`` (control + frames), ``/healthz``, ``/metrics``.

One ``Connection`` per WebSocket: it validates messages (protocol.py), holds the
client's place in the queue or its running ``Rollout`` (sessions.py), and runs a
sender task that drains the client's bounded outbox, so a slow reader only ever
costs dropped frames. The server listens at once but grants sessions only after
a replica has warmed up (one block run and discarded); /healthz says 503 until then.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import WSMsgType, web

from engine.registry import Registry
from engine.spec import Spec

from . import origin, protocol
from .protocol import ProtocolError
from .sessions import Metrics, Outbox, QueueFull, Replica, Rollout, SessionManager, Ticket, \
    stream_source

log = logging.getLogger("fd.serve")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
CLOSE_UNAUTHORIZED = 4401
CLOSE_IDLE = 4408
CLOSE_OVERFLOW = 4429


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


class Server:
    def __init__(self, spec: Spec, config: ServeConfig | None = None, registry: Registry | None = None):
        self.config = config or ServeConfig()
        self.registry = registry or Registry.default()
        self.source = stream_source(spec, self.registry)
        self.manager = SessionManager(self.config.max_queue, max_batch=self.config.max_batch, pace=self.config.pace)
        self.metrics = Metrics()
        self.connections: set[Connection] = set()
        self.ready = False
        self.warmup_error: str | None = None
        self._runner: web.AppRunner | None = None
        self._warmup_task: asyncio.Task | None = None
        self.port: int | None = None

    # ------------------------------------------------------------------ lifecycle
    def app(self) -> web.Application:
        app = web.Application(middlewares=[origin.middleware(self.config.host, tuple(self.config.allow_origins))])
        app.router.add_get("/", self._page)
        app.router.add_get("/app.js", self._page)
        app.router.add_get("/style.css", self._page)
        app.router.add_get("/favicon.ico", self._no_icon)
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self, warm: bool = True) -> int:
        """Listen (port 0 picks a free one; returns the port) and warm replicas up in the background."""
        replicas = [Replica(i, self.source, self.registry) for i in range(self.config.replicas)]
        for r in replicas:
            self.manager.add_replica(r, ready=False)
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self._warmup_task = asyncio.get_running_loop().create_task(self._warm_up(replicas))
        if warm:
            await asyncio.shield(self._warmup_task)
        return self.port

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

    async def stop(self) -> None:
        for c in list(self.connections):
            await c.close(1001, "server shutting down")
        if self._warmup_task is not None:
            with contextlib.suppress(BaseException):
                await self._warmup_task
        if self._runner is not None:
            await self._runner.cleanup()
        for r in self.manager.replicas:
            await asyncio.get_running_loop().run_in_executor(None, r.shutdown)

    # ------------------------------------------------------------------ auth
    def _token_ok(self, given: str | None) -> bool:
        want = self.config.token
        return want is None or (given is not None and hmac.compare_digest(given.encode(), want.encode()))

    def _request_token(self, request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth[7:]
        return request.query.get("token")

    # ------------------------------------------------------------------ HTTP
    async def _page(self, request: web.Request) -> web.Response:
        name = {"/": "index.html"}.get(request.path, request.path.lstrip("/"))
        types = {"html": "text/html", "js": "text/javascript", "css": "text/css"}
        body = resources.files(__package__).joinpath("page", name).read_bytes()
        return web.Response(body=body, content_type=types[name.rsplit(".", 1)[1]], charset="utf-8",
                            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    async def _no_icon(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _healthz(self, request: web.Request) -> web.Response:
        status = "ok" if self.ready else ("failed" if self.warmup_error else "warming")
        body = {"status": status, "spec": self.source.spec.name}
        if self.warmup_error:
            body["error"] = self.warmup_error
        return web.json_response(body, status=200 if self.ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        if not self._token_ok(self._request_token(request)):
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response(self.metrics_snapshot())

    def metrics_snapshot(self) -> dict:
        snap = self.metrics.snapshot()
        stats = self.manager.stats()
        snap.update(ready=self.ready, spec=self.source.spec.name, replicas=len(self.manager.replicas),
                    connections=len(self.connections), queue_length=stats["queue_depth"],
                    active_sessions=stats["sessions"], replica_stats=stats["replicas"])
        snap["active_session"] = snap["active_sessions"][0]["session"] if snap["active_sessions"] else None
        return snap

    def hello(self, authorized: bool) -> dict:
        """The page's first message; ``prompt_switch`` is what a prompt switch does to the cache (the spec's
        ``ar.sampler`` choice, set with e.g. ``fd serve spec nodes.sampler.params.prompt_switch=recache``)."""
        if not authorized:   # nothing about the spec before the token is shown
            return {"type": "hello", "protocol": protocol.PROTOCOL_VERSION, "auth_required": True}
        spec = self.source.spec
        size = next((r.frame_size for r in self.manager.replicas if r.frame_size), None)
        return {"type": "hello", "protocol": protocol.PROTOCOL_VERSION, "spec": spec.name,
                "description": spec.description, "has_prompt": "prompt" in spec.inputs,
                "prompt": spec.inputs.get("prompt") if isinstance(spec.inputs.get("prompt"), str) else None,
                "has_seed": "seed" in spec.inputs, "seed": spec.inputs.get("seed"),
                "controls": self.source.controls, "fps": self.source.fps, "max_blocks": self.source.max_blocks,
                "frame_size": list(size) if size else None, "ready": self.ready,
                "prompt_switch": prompt_switch_mode(spec), "auth_required": not authorized}

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        given = self._request_token(request)
        if given is not None and not self._token_ok(given):
            return web.json_response({"error": "unauthorized"}, status=401)
        ws = web.WebSocketResponse(max_msg_size=self.config.transport_max_bytes, heartbeat=20.0)
        await ws.prepare(request)
        conn = Connection(self, ws, authorized=self._token_ok(given))
        self.connections.add(conn)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)
        return ws


class Connection:
    """One WebSocket client: its queue ticket or rollout, its outbox and sender, its idle clock."""

    def __init__(self, server: Server, ws: web.WebSocketResponse, authorized: bool):
        self.server, self.ws, self.authorized = server, ws, authorized
        self.config = server.config
        self.outbox = Outbox(self.config.outbox_frames)
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
            async for raw in self.ws:
                if raw.type in (WSMsgType.ERROR, WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    break
                if not self._within_rate():
                    continue
                try:
                    msg = protocol.parse_message(raw.data if raw.type == WSMsgType.TEXT else bytes(raw.data))
                    if msg["type"] != "ping":     # the page pings every 2 s: that is not a person using it
                        self.last_message = time.monotonic()
                    if not self.authorized:
                        await self._authorize(msg)
                        continue
                    await self._dispatch(msg)
                except ProtocolError as e:
                    self.send(protocol.error(str(e)))
                if self.ws.closed:
                    break
        finally:
            self.outbox.close()          # nobody to send to any more: drop what is queued
            await self._end_session("disconnected")
            for t in (sender, watchdog):
                t.cancel()
            await asyncio.gather(sender, watchdog, return_exceptions=True)

    async def close(self, code: int, message: str) -> None:
        await self._end_session("closed")
        if not self.ws.closed:
            await self.ws.close(code=code, message=message.encode())

    async def _authorize(self, msg: dict) -> None:
        if msg["type"] == "auth" and self.server._token_ok(msg["token"]):
            self.authorized = True
            self.send({"type": "auth", "ok": True})
            self.send(self.server.hello(True))
            return
        self.send(protocol.error("unauthorized: the first message must be {type: auth, token} with a valid token"))
        await self._flush()
        await self.ws.close(code=CLOSE_UNAUTHORIZED, message=b"unauthorized")

    async def _flush(self, timeout: float = 1.0) -> None:
        end = time.monotonic() + timeout
        while len(self.outbox) and time.monotonic() < end:
            await asyncio.sleep(0.005)

    async def _sender(self) -> None:
        try:
            while True:
                item = await self.outbox.get()
                if item is None:
                    if self.outbox.overflowed and not self.ws.closed:
                        await self.ws.close(code=CLOSE_OVERFLOW, message=b"client not reading")
                    return
                if isinstance(item, bytes):
                    await self.ws.send_bytes(item)
                else:
                    await self.ws.send_str(json.dumps(item))
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            return

    async def _watchdog(self) -> None:
        """Idle timeout: a paused or finished session, or a connection that neither waits nor streams."""
        limit = self.config.idle_timeout
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            now = time.monotonic()
            if not self.authorized and now - self.connected_at > self.config.auth_timeout:
                self.send(protocol.error("unauthorized: no auth message in time"))
                await self._flush()
                await self.ws.close(code=CLOSE_UNAUTHORIZED, message=b"unauthorized")
                return
            quiet = now - self.last_message
            r = self.rollout
            if r is not None and r.idle_since is not None and now - r.idle_since > limit and quiet > limit:
                await self._end_session("idle")
            elif r is None and self.ticket is None and self._starting is None and quiet > limit:
                self.send({"type": "stopped", "session": None, "reason": "idle"})
                await self._flush()
                await self.ws.close(code=CLOSE_IDLE, message=b"idle")
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
        await asyncio.Event().wait()
    finally:
        await server.stop()


def prompt_switch_mode(spec) -> str | None:
    """The ``prompt_switch`` of the spec's AR sampler (default keep), or None without one."""
    for ns in spec.nodes.values():
        if ns.type == "ar.sampler":
            return (ns.params or {}).get("prompt_switch", "keep")
    return None
