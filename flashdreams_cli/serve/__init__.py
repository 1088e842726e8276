"""`fd serve`: interactive streaming of a spec over WebSocket, with a self-contained browser page.

server.py (Starlette app served by uvicorn, connections), sessions.py (replicas, queue,
rollouts), protocol.py (message schema, frame header), encode.py (JPEG frames), videos.py +
render.py (OpenAI-compatible /v1/videos jobs), metrics_prom.py (Prometheus /metrics),
origin.py (Host/Origin guard), client.py (Python client), ray_app.py (Ray Serve deployment),
page/ (index.html, app.js, style.css; no CDN).
"""
from .protocol import FrameHeader, ProtocolError, parse_message
from .server import BackgroundServer, ServeConfig, Server, serve_forever

__all__ = ["BackgroundServer", "FrameHeader", "ProtocolError", "ServeConfig", "Server", "parse_message",
           "serve_forever"]
