"""Tensor dump sink: every block's tensor saved to one safetensors file (keys ``block.<i>``) at session end."""
from __future__ import annotations

from engine.node import Node, Param, Port
from engine.types import TENSOR

from engine.files import AtomicPath


class SafetensorsSink(Node):
    type_name = "sink.safetensors"
    doc = "Dumps the tensor of every block into one .safetensors file (block.0, block.1, ...); atomic on close."
    inputs = (Port("tensor", TENSOR, "any tensor (latents, pixels, ...)"),)
    params = (Param("path", str, "out/tensors.safetensors", "output file"),)
    is_sink = True

    def new_state(self):
        return {}

    def run(self, inputs, state: dict, step):
        state[f"block.{step.block}"] = inputs["tensor"].detach().to("cpu").contiguous()
        return {}

    def close(self, state: dict):
        from safetensors.torch import save_file

        if not state:
            return
        target = AtomicPath(self.p.path)
        try:
            save_file(state, str(target.tmp))
            target.commit()
        except BaseException:
            target.discard()
            raise


