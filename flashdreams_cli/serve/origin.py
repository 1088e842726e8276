"""Who may talk to a local ``fd serve``: Origin and Host checks against web pages in the user's browser.

A server on 127.0.0.1 without a token is reachable by every page the user opens: browsers let any page open
``ws://127.0.0.1:8188/ws`` (WebSockets are not bound by the same-origin policy) and send ``fetch`` requests to
it. Two checks close that, as Jupyter and the Chrome DevTools port do:

* **Origin** — browsers always send it on WebSocket upgrades and cross-origin requests. It must be the server's
  own page (same scheme-less host:port as the request's Host) or one given with ``--allow-origin``. Requests
  without Origin come from programs (the Python client, curl), not from a page, and pass.
* **Host** — DNS rebinding makes ``evil.example`` resolve to 127.0.0.1, so the attacker's page becomes "same
  origin". When the server is bound to loopback, the Host header must name loopback too.
"""
from __future__ import annotations

import json
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def _host_port(netloc: str) -> tuple[str, int | None]:
    parts = urlsplit("//" + netloc)
    try:
        port = parts.port
    except ValueError:
        port = -1            # unparsable: never equal to a real port
    return (parts.hostname or "").lower(), port


def normalize_origin(origin: str) -> str:
    """``http://LOCALHOST:8188/`` -> ``http://localhost:8188`` (what browsers send has no path)."""
    parts = urlsplit(origin.strip())
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}" if parts.scheme and parts.netloc else origin.strip()


def host_ok(host_header: str | None, bound_host: str) -> bool:
    """Bound to loopback, only loopback names may appear in Host (no DNS-rebinding names)."""
    if bound_host not in LOOPBACK_NAMES:
        return True              # a LAN bind: the --token is the guard (serve_cmd warns without one)
    if not host_header:
        return False
    host, port = _host_port(host_header)
    return host in LOOPBACK_NAMES and port != -1


def origin_ok(origin: str | None, host_header: str | None, allowed: tuple[str, ...]) -> bool:
    if origin is None:
        return True              # not a browser page (browsers always send Origin on a WebSocket upgrade)
    norm = normalize_origin(origin)
    if norm in allowed:
        return True
    parts = urlsplit(norm)
    if parts.scheme not in ("http", "https") or not host_header:
        return False             # "null" (sandboxed frames, file://) and anything odd
    return _host_port(parts.netloc) == _host_port(host_header) or (
        _default_port(parts) == _host_port(host_header))


def _default_port(parts) -> tuple[str, int | None]:
    """``http://localhost`` and Host ``localhost:80`` are the same origin."""
    host, port = _host_port(parts.netloc)
    return host, port if port is not None else {"http": 80, "https": 443}[parts.scheme]


class OriginGuard:
    """ASGI middleware: HTTP requests and WebSocket upgrades that fail the Host or Origin rule get 403 before
    any route runs (a WebSocket is refused at the handshake, so a hostile page never sees ``hello``)."""

    def __init__(self, app, bound_host: str, allowed_origins: tuple[str, ...]):
        self.app = app
        self.bound_host = bound_host
        self.allowed = tuple(normalize_origin(o) for o in allowed_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host, origin = headers.get("host"), headers.get("origin")
        why = None
        if not host_ok(host, self.bound_host):
            why = f"forbidden: Host {host!r} is not this server (DNS rebinding?)"
        elif not origin_ok(origin, host, self.allowed):
            why = (f"forbidden: origin {origin!r} is not allowed (start fd serve with --allow-origin to allow "
                   "a page)")
        if why is None:
            return await self.app(scope, receive, send)
        await refuse(scope, send, 403, {"error": why})


async def refuse(scope, send, status: int, body: dict) -> None:
    """Answer an HTTP request, or refuse a WebSocket upgrade, with ``status`` and a JSON body. Servers without the
    ASGI WebSocket denial-response extension can only refuse an upgrade with 403."""
    data = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": data})
    elif "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": head})
        await send({"type": "websocket.http.response.body", "body": data})
    else:
        await send({"type": "websocket.close", "code": 1008})
