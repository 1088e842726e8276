"""`wan22.experts`: two causal Wan DiTs (Wan 2.2 A14B high- and low-noise experts) as one causal model.

Wire two ``wan.dit`` nodes (``transformer/`` = high noise, ``transformer_2/`` = low noise) into
``high`` and ``low``; the output goes to ``ar.sampler.model``. A denoising step at
``t >= boundary_ratio x 1000`` runs the high-noise expert, any other the low-noise one; each expert
keeps its own KV cache and the context pass refreshes both (nodes/wan/moe.py). The sampler's own
``boundary_ratio`` (x at the boundary, add_noise_high) must be the same number: ``ar.sampler``
checks it. Before any weight is read (``preflight``) the two experts' checkpoints must exist and
describe the same sizes.
"""
from __future__ import annotations

from engine.errors import FdError
from engine.node import SESSION, Node, Param, Port
from engine.types import CAUSAL_DENOISER

from .causal import WanDenoiser
from .moe import CROSS_MODES, Wan22Experts, check_experts


class Wan22ExpertsNode(Node):
    type_name = "wan22.experts"
    doc = ("Wan 2.2 A14B: a high-noise and a low-noise causal Wan DiT split at a timestep boundary, each with its own "
           "KV cache, as one causal model for ar.sampler.")
    inputs = (
        Port("high", CAUSAL_DENOISER, "the high-noise expert (a wan.dit; FastVideo transformer/)"),
        Port("low", CAUSAL_DENOISER, "the low-noise expert (a wan.dit; FastVideo transformer_2/)"),
    )
    outputs = (Port("model", CAUSAL_DENOISER, "both experts behind the causal-model contract"),)
    params = (
        Param("boundary_ratio", float, 0.875, "t / 1000 >= this runs the high-noise expert (FastVideo and "
              "FlashDreams: 0.875); strictly between 0 and 1", min=0.0, max=1.0),
        Param("cross_attention", str, "shared_high", "text cross-attention K/V: shared_high (FastVideo: one cache "
              "filled by the high-noise expert, used by both) or per_expert (FlashDreams)", choices=CROSS_MODES),
    )
    phase = SESSION

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 < float(self.p.boundary_ratio) < 1.0:
            raise ValueError(f"boundary_ratio must lie strictly between 0 and 1, got {self.p.boundary_ratio}")
        self._made: tuple | None = None
        self._high = None   # the high-noise expert's node, once the plan has shown it (memory_estimate, preflight)

    def facts(self, sources) -> dict:
        b = float(self.p.boundary_ratio) * 1000.0
        return {"notes": [f"high: t >= {b:g}, own KV cache", f"low: t < {b:g}, own KV cache",
                          f"text K/V: {self.p.cross_attention}"]}

    def memory_estimate(self, upstream) -> dict:
        """No weights of its own (the experts' nodes count theirs). The memory plan asks nodes in graph
        order, so this call, before ar.sampler's, is where the expert whose layout the caches share is seen."""
        self._high = upstream.get("high")
        return {"weights": 0, "weights_source": ""}

    @property
    def cache_layout(self):
        """ar.sampler's cache sizing (nodes/ar/memory.py): the experts' shared layout with ``kv_copies`` 2, since
        each expert keeps its own self-attention cache and its own copy of the prompt's cross K/V (both modes of
        ``cross_attention`` copy the K/V into each expert's static buffers). None until an expert node was seen."""
        layout = getattr(self._high, "cache_layout", None)
        if not callable(layout):
            return None
        return lambda: {**layout(), "kv_copies": 2}

    def preflight(self, upstream) -> None:
        """Both experts' checkpoints are there and agree on every size, before any weight is read."""
        self._high = upstream.get("high")
        cfgs = {}
        for port in ("high", "low"):
            node = upstream.get(port)
            get = getattr(node, "checkpoint_config", None)
            if get is None:
                continue
            try:
                cfgs[port] = get()
            except (FdError, ValueError) as e:
                raise FdError(f"node {self.name!r}: the {port}-noise expert (node {node.name!r}): {e}") from e
        if len(cfgs) == 2:
            try:
                check_experts(cfgs["high"], cfgs["low"])
            except ValueError as e:
                raise FdError(f"node {self.name!r}: {e} (nodes {upstream['high'].name!r} and "
                              f"{upstream['low'].name!r})") from e

    def run(self, inputs, state, step):
        high, low = inputs["high"], inputs["low"]
        for port, m in (("high", high), ("low", low)):
            if not isinstance(m, WanDenoiser):
                raise FdError(f"node {self.name!r}: input `{port}` is a {type(m).__name__}, not a wan.dit model")
        key = (id(high), id(low))
        if self._made is None or self._made[0] != key:   # one object per pair: ar.sampler reuses its stream
            try:
                model = Wan22Experts(high, low, float(self.p.boundary_ratio) * 1000.0, self.p.cross_attention)
            except ValueError as e:
                raise FdError(f"node {self.name!r}: {e}") from e
            self._made = (key, model)
        return {"model": self._made[1]}


NODE_TYPES = (Wan22ExpertsNode,)
