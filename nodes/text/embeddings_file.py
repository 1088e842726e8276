"""`text.embeddings_file`: prompt embeddings computed elsewhere, read from a safetensors file.

Some models condition on an encoder too large or not yet built here (OmniDreams and Cosmos-Predict2.5 use
Cosmos-Reason1 features, 100352 wide). Their specs can run now on embeddings made once offline: this node
reads the tensor ``key`` (and, for guidance, ``negative_key``) and checks the width the DiT expects, so a file
of another encoder is a clear error, not a shape failure inside the first attention layer.
"""
from __future__ import annotations

import torch

from engine.errors import FdError
from engine.node import SESSION, Node, Param, Port
from engine.types import TEXT_EMBEDDING


class TextEmbeddingsFileNode(Node):
    type_name = "text.embeddings_file"
    doc = "Prompt (and negative prompt) embeddings [1, L, C] read from a safetensors file, width checked."
    outputs = (Port("embeds", TEXT_EMBEDDING, "prompt embeddings [B, L, C]"),
               Port("negative_embeds", TEXT_EMBEDDING, "negative prompt embeddings (when negative_key is set)"))
    params = (
        Param("path", str, "", "safetensors file (local or hf://)"),
        Param("key", str, "embeds", "tensor of the prompt's embeddings, [L, C] or [B, L, C]"),
        Param("negative_key", str, None, "tensor of the negative prompt's embeddings", nullable=True),
        Param("width", int, 100352, "embedding width the model takes (Cosmos-Reason1: 100352)", min=1),
    )
    phase = SESSION

    def run(self, inputs, state, step):
        from safetensors import safe_open

        from nodes.checkpoint import resolve
        path = resolve(self.p.path, kind="file")
        out = {}
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            for port, key in (("embeds", self.p.key), ("negative_embeds", self.p.negative_key)):
                if key is None:
                    continue
                if key not in names:
                    raise FdError(f"node {self.name!r}: {self.p.path} has no tensor {key!r} (it holds "
                                  f"{', '.join(names[:8])}{' ...' if len(names) > 8 else ''})")
                t = f.get_tensor(key)
                t = t[None] if t.ndim == 2 else t
                if t.ndim != 3 or t.shape[-1] != self.p.width:
                    raise FdError(f"node {self.name!r}: {self.p.path}:{key} is {list(t.shape)}; expected [L, "
                                  f"{self.p.width}] or [B, L, {self.p.width}] (params.width: the model's text "
                                  "width)")
                out[port] = t.to(self.device, torch.float32)
        return out


NODE_TYPES = (TextEmbeddingsFileNode,)
