"""Sinks: where frames and tensors leave the engine. All writes are atomic."""
from .mp4 import Mp4Sink
from .png import PngSink
from .tensors import SafetensorsSink

NODE_TYPES = (Mp4Sink, PngSink, SafetensorsSink)
