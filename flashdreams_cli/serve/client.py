"""A small asyncio client for `fd serve`: for tests, load simulators and scripted demos.

    async with Client.connect("http://127.0.0.1:8188", token=None) as c:
        await c.start(prompt="a fox in the snow", seed=1)
        started = await c.wait_for("started")
        frame = await c.next_frame()          # Frame(header, jpeg); frame.image() -> [H, W, 3] uint8
        await c.prompt("the fox starts running")
        await c.pause(); await c.resume(); await c.stop()

Text messages and frames arrive on one socket; ``wait_for`` keeps the frames it
passes over in ``c.frames`` (bounded) so nothing a test wants to look at is lost.
"""
from __future__ import annotations

import asyncio
import collections
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np

from .encode import JpegDecoder
from .protocol import FrameHeader


@dataclass
class Frame:
    header: FrameHeader
    jpeg: bytes
    received_at: float

    def image(self, decoder: JpegDecoder | None = None) -> np.ndarray:
        return (decoder or JpegDecoder()).decode(self.jpeg)


class ServerClosed(ConnectionError):
    pass


class Client:
    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse, keep_frames: int = 4096):
        self._http, self.ws = session, ws
        self.hello: dict = {}
        self.messages: list[dict] = []                        # every JSON message received, in order
        self.frames: collections.deque[Frame] = collections.deque(maxlen=keep_frames)
        self.decoder = JpegDecoder()

    @classmethod
    async def open(cls, url: str, token: str | None = None, token_in_query: bool = True,
                   keep_frames: int = 4096, timeout: float = 10.0) -> "Client":
        """Connect to ``url`` (http://host:port); with a token, pass it in the URL or as the first message."""
        ws_url = url.rstrip("/").replace("http://", "ws://").replace("https://", "wss://") + "/ws"
        params = {"token": token} if token is not None and token_in_query else None
        http = aiohttp.ClientSession()
        try:
            ws = await http.ws_connect(ws_url, params=params, timeout=aiohttp.ClientWSTimeout(ws_close=timeout),
                                       max_msg_size=64 << 20)
        except BaseException:
            await http.close()
            raise
        client = cls(http, ws, keep_frames)
        client.hello = await client.wait_for("hello", timeout=timeout)
        if token is not None and not token_in_query:
            await client.send({"type": "auth", "token": token})
            client.hello = await client.wait_for("hello", timeout=timeout)
        return client

    @classmethod
    def connect(cls, url: str, **kw) -> "_Connecting":
        return _Connecting(cls.open(url, **kw))

    async def close(self) -> None:
        await self.ws.close()
        await self._http.close()

    # ------------------------------------------------------------------ sending
    async def send(self, msg: dict[str, Any]) -> None:
        await self.ws.send_str(json.dumps(msg))

    async def start(self, prompt: str | None = None, seed: int | None = None, **options) -> None:
        msg: dict[str, Any] = {"type": "start"}
        if prompt is not None:
            msg["prompt"] = prompt
        if seed is not None:
            msg["seed"] = seed
        if options:
            msg["options"] = options
        await self.send(msg)

    async def prompt(self, text: str) -> None:
        await self.send({"type": "prompt", "prompt": text})

    async def control(self, kind: str, value: list[float] | dict[str, float]) -> None:
        """kind is "camera" or "action", whichever run input the spec has (hello["controls"])."""
        await self.send({"type": kind, "value": value})

    async def pause(self) -> None:
        await self.send({"type": "pause"})

    async def resume(self) -> None:
        await self.send({"type": "resume"})

    async def reset(self) -> None:
        await self.send({"type": "reset"})

    async def stop(self) -> None:
        await self.send({"type": "stop"})

    async def ping(self) -> dict:
        await self.send({"type": "ping", "t": time.time() * 1e3})
        return await self.wait_for("pong")

    # ------------------------------------------------------------------ receiving
    async def _read(self, timeout: float) -> dict | Frame:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type == aiohttp.WSMsgType.BINARY:
            header, jpeg = FrameHeader.unpack(msg.data)
            frame = Frame(header, jpeg, time.time() * 1e3)
            self.frames.append(frame)
            return frame
        if msg.type == aiohttp.WSMsgType.TEXT:
            data = json.loads(msg.data)
            self.messages.append(data)
            return data
        raise ServerClosed(f"connection closed ({msg.type.name}, code {self.ws.close_code}, {msg.extra!r})")

    async def recv(self, timeout: float = 10.0) -> dict | Frame:
        """The next JSON message (dict) or Frame."""
        return await self._read(timeout)

    async def wait_for(self, *types: str, timeout: float = 10.0) -> dict:
        """Read until a JSON message of one of ``types``; frames and other messages passed over stay recorded."""
        item, _ = await self.collect_until(*types, timeout=timeout)
        return item

    async def next_frame(self, timeout: float = 10.0) -> Frame:
        item, _ = await self._read_until(lambda x: isinstance(x, Frame), "frame", timeout)
        return item

    async def _read_until(self, done, what: str, timeout: float) -> tuple[dict | Frame, list[Frame]]:
        """Read until ``done(item)``; returns that item and the frames read before it."""
        frames: list[Frame] = []
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise asyncio.TimeoutError(f"no {what} within {timeout} s")
            item = await self._read(left)
            if done(item):
                return item, frames
            if isinstance(item, Frame):
                frames.append(item)

    async def collect_until(self, *types: str, timeout: float = 10.0) -> tuple[dict, list[Frame]]:
        """Frames received until a message of ``types`` arrives, and that message."""
        return await self._read_until(lambda x: isinstance(x, dict) and x.get("type") in types,
                                      f"{'/'.join(types)} message", timeout)


class _Connecting:
    """``async with Client.connect(url) as c``: connect on enter, close on exit."""

    def __init__(self, coro):
        self._coro = coro
        self.client: Client | None = None

    async def __aenter__(self) -> Client:
        self.client = await self._coro
        return self.client

    async def __aexit__(self, *exc) -> None:
        if self.client is not None:
            await self.client.close()
