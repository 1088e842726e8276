"""The wire protocol of `fd serve`: JSON control messages one way, binary JPEG frames the other.

Client -> server (text, one JSON object each, at most ``MAX_MESSAGE_BYTES``):

    {"type": "auth",   "token": "..."}                      first message when a token is required
    {"type": "start",  "prompt": "...", "seed": 7, "options": {"quality": 85, "blocks": 4, "pace": "asap"}}
                                                             pace: realtime (the spec's fps, default) or asap
    {"type": "prompt", "prompt": "..."}                      switch mid-stream (KV cache kept)
    {"type": "camera" | "action", "value": [f, ...] | {"k": f}}   only when the spec has that run input
    {"type": "pause" | "resume" | "reset" | "stop"}
    {"type": "save"}                                         snapshot the session at the next block boundary
    {"type": "branch", "save": 1, "prompt": "..."}           go back to a saved point (prompt optional)
    {"type": "ping",   "t": 123.4}                           answered by pong (clock offset, RTT)

Every field is checked explicitly per type (unknown fields are refused too), so a
malformed message gets ``{"type": "error", "message": ...}`` back and the session
goes on: one bad keystroke in a browser must not kill a rollout.

Server -> client text: hello, queue {position}, started, block, prompt, paused,
resumed, reset, saved {save, block}, branched {session, previous, save, block}, done,
stopped {reason}, pong, error {message}.

Server -> client binary: one frame per message, ``FrameHeader`` (28 bytes,
little-endian) then a complete JPEG. The header carries the session id so a
client drops frames of a session it has reset or stopped, and a server-clock
timestamp (ms since the epoch) for latency overlays.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 16 * 1024
MAX_PROMPT_CHARS = 2000
MAX_TOKEN_CHARS = 512
MAX_CONTROL_VALUES = 64
MAX_SEED = 2**63 - 1
QUALITY_RANGE = (1, 100)
CONTROL_TYPES = ("camera", "action")
PACES = ("realtime", "asap")     # how fast a session is generated: at the spec's fps, or as fast as possible


class ProtocolError(ValueError):
    """A client message that does not follow the schema; the reply is an error message, not a disconnect."""


def _no_extra(msg: dict, allowed: tuple[str, ...]) -> None:
    extra = sorted(set(msg) - set(allowed) - {"type"})
    if extra:
        raise ProtocolError(f"{msg['type']}: unknown field(s) {', '.join(extra)} (allowed: "
                            f"{', '.join(allowed) or 'none'})")


def _int(msg: dict, name: str, lo: int, hi: int) -> int:
    v = msg[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(f"{name} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ProtocolError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def _text(msg: dict, name: str, limit: int) -> str:
    v = msg[name]
    if not isinstance(v, str):
        raise ProtocolError(f"{name} must be a string, got {type(v).__name__}")
    if len(v) > limit:
        raise ProtocolError(f"{name} is too long ({len(v)} > {limit} characters)")
    return v


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProtocolError(f"{what} must be a finite number, got {v!r}")
    return float(v)


def _check_start(msg: dict) -> None:
    _no_extra(msg, ("prompt", "seed", "options"))
    if "prompt" in msg:
        _text(msg, "prompt", MAX_PROMPT_CHARS)
    if "seed" in msg:
        _int(msg, "seed", 0, MAX_SEED)
    opts = msg.get("options", {})
    if not isinstance(opts, dict):
        raise ProtocolError("options must be an object")
    extra = sorted(set(opts) - {"quality", "blocks", "pace"})
    if extra:
        raise ProtocolError(f"options: unknown option(s) {', '.join(extra)} (allowed: quality, blocks, pace)")
    if "pace" in opts and opts["pace"] not in PACES:
        raise ProtocolError(f"options.pace must be one of {', '.join(PACES)}, got {opts['pace']!r}")
    if "quality" in opts:
        _int(opts, "quality", *QUALITY_RANGE)
    if "blocks" in opts:
        _int(opts, "blocks", 1, 2**31 - 1)


def _check_control(msg: dict) -> None:
    _no_extra(msg, ("value",))
    if "value" not in msg:
        raise ProtocolError(f"{msg['type']}: missing field value")
    v = msg["value"]
    if isinstance(v, list):
        if len(v) > MAX_CONTROL_VALUES:
            raise ProtocolError(f"value has {len(v)} numbers (at most {MAX_CONTROL_VALUES})")
        msg["value"] = [_number(x, "value[]") for x in v]
    elif isinstance(v, dict):
        if len(v) > MAX_CONTROL_VALUES:
            raise ProtocolError(f"value has {len(v)} keys (at most {MAX_CONTROL_VALUES})")
        msg["value"] = {str(k)[:64]: _number(x, f"value.{k}") for k, x in v.items()}
    else:
        raise ProtocolError("value must be a list of numbers or an object of numbers")


def _check_required(name: str, limit: int):
    def check(msg: dict) -> None:
        _no_extra(msg, (name,))
        if name not in msg:
            raise ProtocolError(f"{msg['type']}: missing field {name}")
        _text(msg, name, limit)
    return check


def _check_ping(msg: dict) -> None:
    _no_extra(msg, ("t",))
    if "t" in msg:
        _number(msg["t"], "t")


def _check_bare(msg: dict) -> None:
    _no_extra(msg, ())


def _check_branch(msg: dict) -> None:
    _no_extra(msg, ("save", "prompt"))
    if "save" not in msg:
        raise ProtocolError("branch: missing field save")
    _int(msg, "save", 1, 2**31 - 1)
    if "prompt" in msg:
        _text(msg, "prompt", MAX_PROMPT_CHARS)


CHECKS = {
    "auth": _check_required("token", MAX_TOKEN_CHARS),
    "start": _check_start,
    "prompt": _check_required("prompt", MAX_PROMPT_CHARS),
    "camera": _check_control,
    "action": _check_control,
    "pause": _check_bare,
    "resume": _check_bare,
    "reset": _check_bare,
    "stop": _check_bare,
    "save": _check_bare,
    "branch": _check_branch,
    "ping": _check_ping,
}


def parse_message(text: str | bytes) -> dict:
    """A checked client message, or ``ProtocolError`` saying exactly what is wrong with it."""
    if isinstance(text, (bytes, bytearray)):
        raise ProtocolError("binary messages are not accepted from clients; send JSON text")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message too large (limit {MAX_MESSAGE_BYTES} bytes)")
    try:
        msg = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a JSON object with a type field")
    kind = msg.get("type")
    if not isinstance(kind, str) or kind not in CHECKS:
        raise ProtocolError(f"unknown message type {kind!r} (known: {', '.join(CHECKS)})")
    CHECKS[kind](msg)
    return msg


def error(message: str) -> dict:
    return {"type": "error", "message": message}


# --------------------------------------------------------------------------- binary frames
@dataclass(frozen=True)
class FrameHeader:
    session: int        # server-assigned id of the rollout the frame belongs to (new after reset)
    block: int          # autoregressive block that produced it
    index: int          # frame index within the session, from 0
    width: int
    height: int
    timestamp_ms: float  # server wall clock when encoded (ms since the epoch)
    last_in_block: bool = False

    MAGIC = b"FD"
    STRUCT = struct.Struct("<2sBBIIIHHd")

    def pack(self, jpeg: bytes) -> bytes:
        flags = 1 if self.last_in_block else 0
        return self.STRUCT.pack(self.MAGIC, PROTOCOL_VERSION, flags, self.session, self.block, self.index,
                                self.width, self.height, self.timestamp_ms) + jpeg

    @classmethod
    def unpack(cls, data: bytes) -> tuple["FrameHeader", bytes]:
        if len(data) < cls.STRUCT.size:
            raise ProtocolError(f"binary frame shorter than its {cls.STRUCT.size}-byte header")
        magic, version, flags, session, block, index, w, h, ts = cls.STRUCT.unpack_from(data)
        if magic != cls.MAGIC or version != PROTOCOL_VERSION:
            raise ProtocolError(f"not an fd frame (magic {magic!r}, version {version})")
        return cls(session, block, index, w, h, ts, bool(flags & 1)), bytes(data[cls.STRUCT.size:])


HEADER_BYTES = FrameHeader.STRUCT.size
