"""Weight bytes of a model node for the memory plan, without reading a weight.

When the checkpoint is on this machine (a local file, or a hub reference already in the cache) the
module is built on the meta device from the checkpoint's own shapes (safetensors headers, memory-mapped
torch files): the same ``build_from`` the loader uses, so what is counted is what will be loaded, keys
the node drops included. Otherwise the size params give the module (``build_random`` on meta). Nothing
is downloaded: the hub is asked in offline mode.
"""
from __future__ import annotations

import contextlib
import os

from .params import is_random, resolve_dtype


@contextlib.contextmanager
def no_downloads():
    """Hub references resolve from the local cache only while planning."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def checkpoint_param_count(node) -> int | None:
    """Parameters of the module built from the checkpoint's shapes, or None when the file is not here."""
    if node.random_weights or is_random(getattr(node.p, "checkpoint", None)):
        return None
    import torch
    try:
        with no_downloads():
            built = node.build_from(node.open_weights())
    except Exception:  # noqa: BLE001 - not cached, unreadable: the size params answer instead
        return None
    with torch.device("meta"):
        return sum(p.numel() for p in built.module.parameters())


def weight_estimate(node) -> dict:
    """{"weights": bytes, "weights_source": how} for a ``ModelNode``."""
    dtype = resolve_dtype(node.p.dtype, node.device)
    size = dtype.itemsize
    name = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32") \
        .replace("float16", "fp16")
    count = checkpoint_param_count(node)
    if count is not None:
        return {"weights": count * size, "weights_source": f"checkpoint shapes, {name}"}
    return {"weights": int(node.estimate_bytes()), "weights_source": f"size params, {name}"}
