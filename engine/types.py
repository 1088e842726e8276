"""Port types: what flows along an edge of the graph.

Types are plain named values with an optional parent, so a port that wants any
tensor (``TENSOR``) accepts a ``LATENT`` but a port that wants ``PIXELS`` refuses
a ``LATENT``. This is what lets validation catch a decoder wired to a text
embedding before a single weight is read.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PortType:
    name: str
    doc: str = ""
    parent: "PortType | None" = None

    def is_a(self, other: "PortType") -> bool:
        """True when a value of this type may flow into a port of type ``other``."""
        if other is ANY or self is ANY:
            return True
        t: PortType | None = self
        while t is not None:
            if t.name == other.name:
                return True
            t = t.parent
        return False

    def __str__(self) -> str:
        return self.name


ANY = PortType("any", "accepts and produces anything (generic tensor ops)")
TENSOR = PortType("tensor", "a torch tensor of no particular role")
LATENT = PortType("latent", "latent video [B, F, C, H, W] in the model's latent space", TENSOR)
PIXELS = PortType("pixels", "video frames [B, T, 3, H, W] in [-1, 1]", TENSOR)
IMAGE = PortType("image", "one image [B, 3, H, W] in [-1, 1]", TENSOR)
TEXT_EMBEDDING = PortType("text_embedding", "encoded prompt [B, L, D]", TENSOR)
IMAGE_EMBEDDING = PortType("image_embedding", "encoded image tokens [B, N, D]", TENSOR)
CAMERA = PortType("camera", "camera / action conditioning per latent frame", TENSOR)
MODEL = PortType("model", "a loaded model handle (weights on a device)")
DENOISER = PortType("denoiser", "a model that predicts flow for (x_t, t, conditioning)", MODEL)
CAUSAL_DENOISER = PortType("causal_denoiser", "a denoiser that streams block by block with its own KV cache: it "
                           "implements the causal-model contract (nodes/common/causal.py) that ar.sampler drives",
                           DENOISER)
DECODER = PortType("decoder", "a latent-to-pixel decoder model", MODEL)
TEXT = PortType("text", "a string (prompt)")
INT = PortType("int", "an integer")
FLOAT = PortType("float", "a float")
BOOL = PortType("bool", "a boolean")
LIST = PortType("list", "a list of values")
STATE = PortType("state", "per-session state owned by a node (KV cache, decoder memory)")

BUILTIN_TYPES = {t.name: t for t in (ANY, TENSOR, LATENT, PIXELS, IMAGE, TEXT_EMBEDDING, IMAGE_EMBEDDING,
                                     CAMERA, MODEL, DENOISER, CAUSAL_DENOISER, DECODER, TEXT, INT, FLOAT, BOOL, LIST, STATE)}


def type_of_value(value) -> PortType:
    """Type of a run input (``inputs:`` section) from its Python value."""
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return INT
    if isinstance(value, float):
        return FLOAT
    if isinstance(value, str):
        return TEXT
    if isinstance(value, (list, tuple)):
        return LIST
    return ANY
