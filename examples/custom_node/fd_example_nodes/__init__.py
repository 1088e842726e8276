"""An example node package: a node that inverts the colours of a video, and a toy causal world model
(``toy_causal.py``) that streams through ``ar.sampler`` without being Wan."""
from engine import Node, Param, Port
from engine.types import PIXELS


class Invert(Node):
    type_name = "example.invert"
    doc = "Inverts the colours of frames in [-1, 1] (an example third-party node)."
    inputs = (Port("pixels", PIXELS, "frames [B, T, 3, H, W]"),)
    outputs = (Port("pixels", PIXELS, "inverted frames"),)
    params = (Param("strength", float, 1.0, "0 = unchanged, 1 = fully inverted", min=0.0, max=1.0),)

    def run(self, inputs, state, step):
        x = inputs["pixels"]
        return {"pixels": x * (1 - 2 * self.p.strength)}


def node_types():
    from .toy_causal import ToyCausalNode
    return [Invert, ToyCausalNode]
