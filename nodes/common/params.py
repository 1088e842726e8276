"""Params and helpers every model node shares: weights source, dtype, random-weight seeds.

A model node takes ``checkpoint`` (a local path, an ``hf://`` reference, or
``random`` for deterministic random weights of the size given by the node's size
params) and ``dtype`` (``auto`` = bf16 on CUDA, fp32 elsewhere). Keeping the
spelling in one place means every spec reads the same way. ``nodes.common.model_node.ModelNode``
uses these; a node that is not a ModelNode may use them directly.
"""
from __future__ import annotations

import torch

from engine.errors import FdError
from engine.node import Param

RANDOM = "random"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto",) + tuple(DTYPES)


def checkpoint_param(default: str, what: str) -> Param:
    return Param("checkpoint", str, default,
                 f"{what}: a local file/folder, an hf://org/repo/path reference, or 'random' (random weights "
                 "of the size the size params give; for demos and benchmarks)")


def dtype_param(default: str = "auto") -> Param:
    return Param("dtype", str, default, "weights/compute dtype: auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16, fp16",
                 choices=DTYPE_CHOICES)


def seed_param() -> Param:
    return Param("init_seed", int, 0, "seed of the random weights (checkpoint: random)")


def is_random(ref: str | None) -> bool:
    return ref is None or ref == RANDOM


def resolve_dtype(name: str, device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return DTYPES[name]


def dtype_bytes(name: str, device) -> int:
    return torch.empty((), dtype=resolve_dtype(name, device)).element_size()


def meta_param_count(factory) -> int:
    """Parameters of the module ``factory`` builds, counted on the meta device (no memory)."""
    with torch.device("meta"):
        module = factory()
    return sum(p.numel() for p in module.parameters())


def require_loaded(node, attr: str):
    value = getattr(node, attr, None)
    if value is None:
        raise FdError(f"node {node.name!r} ({node.type_name}) ran before load()")
    return value
