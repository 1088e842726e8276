"""`PromptEncoderNode`: what every text-encoder node does around its model, written once.

A prompt's encoding depends on the weights only, so it is cached on the node (shared by sessions, least
recently used first out): an unchanged or repeated prompt costs nothing and hands on the very same tensor, and
downstream nodes then see no change. ``offload: true`` moves the weights to host memory after the session's
encoding; the next new prompt brings them back. The node encodes ``prompt`` and, when wired, ``negative`` with
the same weights.

A subclass declares its ports and params (with ``CACHE_SIZE``) and writes ``encode_uncached(prompt)``: the
tokenizer and the forward of its family; its ``load`` calls this one first and then sets up the tokenizer.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from engine.errors import FdError
from engine.node import SESSION, Param

from .model_node import ModelNode

CACHE_SIZE = Param("cache_size", int, 8, "prompts kept encoded", min=1)


class PromptEncoderNode(ModelNode):
    phase = SESSION

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokenizer = None
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def load(self, progress=None) -> None:
        super().load(progress)
        self.tokenizer = None
        self._cache.clear()          # new weights: old encodings no longer hold

    def encode_uncached(self, prompt: str) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}.encode_uncached")

    def encode(self, prompt: str) -> torch.Tensor:
        """The embeddings of ``prompt`` (cached)."""
        model = self.require_model()
        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        if model.device != torch.device(self.device):      # offloaded after an earlier session
            model.to(self.device)
        with torch.no_grad():
            out = self.encode_uncached(prompt)
        self._cache[prompt] = out
        while len(self._cache) > self.p.cache_size:
            self._cache.popitem(last=False)
        return out

    def offload(self) -> None:
        if self.model is not None and not str(self.device).startswith("cpu"):
            self.model.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def run(self, inputs, state, step):
        out = {}
        for port, key in (("prompt", "embeds"), ("negative", "negative_embeds")):
            if port in inputs:
                if not isinstance(inputs[port], str):
                    raise FdError(f"node {self.name!r}: {port} must be a string, got {type(inputs[port]).__name__}")
                out[key] = self.encode(inputs[port])
        return out
