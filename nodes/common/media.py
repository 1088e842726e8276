"""What a video source tells the nodes downstream of it: where it came from, its frame rate, its audio.

A super-resolution or restyling run must come out at the input's frame rate and with the
input's sound, so the MP4 sink needs to know the source. The source node (``video.input``)
emits a ``MediaSource`` on a port of type ``MEDIA``; the sink, when that port is wired,
keeps the frame rate and copies the audio stream (remuxed, not re-encoded). A live feed
has no file: ``path`` None, no audio.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from engine.types import PortType

MEDIA = PortType("media", "a media source description (file, frame rate, audio track) from a video input")


@dataclass(frozen=True)
class MediaSource:
    path: str | None          # the file the frames come from (None: a live feed)
    fps: Fraction             # frames per second of the source
    width: int                # source frame size, before any upscaling
    height: int
    frames: int | None        # frames in the source (None: unknown / live)
    audio: bool = False       # the file has an audio stream a sink can copy
