"""`fd serve`: interactive streaming of a spec over WebSocket, with a self-contained browser page.

server.py (aiohttp app, connections), sessions.py (replicas, queue, rollouts),
protocol.py (message schema, frame header), encode.py (JPEG frames), client.py
(Python client), page/ (index.html, app.js, style.css; no CDN).
"""
from .protocol import FrameHeader, ProtocolError, parse_message
from .server import BackgroundServer, ServeConfig, Server, serve_forever

__all__ = ["BackgroundServer", "FrameHeader", "ProtocolError", "ServeConfig", "Server", "parse_message",
           "serve_forever"]
