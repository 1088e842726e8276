"""Built-in node types of fd.

Each module listed in ``_NODE_MODULES`` exposes ``NODE_TYPES``, a tuple of
``engine.node.Node`` subclasses. Importing is deferred to ``builtin_node_types``
so ``import nodes`` stays cheap.
"""
from __future__ import annotations

import importlib

_NODE_MODULES: tuple[str, ...] = (
    "nodes.basic.noise",
    "nodes.basic.tensor_ops",
    "nodes.sinks",
    "nodes.text.node",
    "nodes.text.embeddings_file",
    "nodes.image.node",
    "nodes.wan.node_dit",
    "nodes.wan.node_vae",
    "nodes.wan.node_t2v",
    "nodes.wan.node_experts",
    "nodes.cosmos.node",
    "nodes.cosmos.text",
    "nodes.cosmos.reason1",
    "nodes.omnidreams.node",
    "nodes.ar.node",
    "nodes.taehv.node",
    "nodes.lingbot.node",
    "nodes.video.node",
    "nodes.flashvsr.node_dit",
    "nodes.world.node",
    "nodes.flashvsr.node_decode",
)


def builtin_node_types() -> list:
    out = []
    for mod in _NODE_MODULES:
        out.extend(importlib.import_module(mod).NODE_TYPES)
    return out
