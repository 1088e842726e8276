"""`ModelNode`: the load recipe every model node follows, written once.

Every node that holds weights loads them the same way, and each used to spell the
way out itself: pick the dtype (``auto`` = bf16 on CUDA, fp32 elsewhere), then
either

- ``checkpoint: random`` (tiny specs, benchmarks): build the module of the size
  params on the meta device, fill it with deterministic random weights
  (``nodes.checkpoint.random_init``), and put back the constants that random init
  zeroes (latent statistics, position ids); or
- a checkpoint: open it lazily, derive the module's config from its shapes, build on
  the meta device, and ``load_into`` it one tensor at a time (renamed by a key map)
  so a 14B model never needs a second full copy;

then eval mode without gradients. What differs between families is only *which*
module and *which* renaming, so a subclass writes those as hooks and the base ties
them together, also giving ``estimate_bytes`` (a meta-device parameter count), a
progress bar while tensors load, and errors that name the node.

A subclass implements:

    build_random() -> nn.Module            # the module of the size params (called under meta)
    build_from(checkpoint) -> Built        # module built on meta from the checkpoint, its weights, key map
    constants(module)                      # optional: non-persistent constants, on self.device
    finish(module) -> nn.Module            # optional: tie weights, channels-last, compile (after loading)
    loaded(module)                         # optional: keep it (default: self.model = module)

and may override ``random_weights`` (when to ignore ``checkpoint``) and
``open_weights()`` (how a reference becomes a lazy state dict).
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import torch
from torch import nn

from engine.node import Node

from .params import dtype_bytes, is_random, meta_param_count, require_loaded, resolve_dtype
from .progress import ProgressCallback, load_progress


class Built(NamedTuple):
    """What ``build_from`` returns: a module on the meta device and what to load into it."""
    module: nn.Module
    weights: Mapping[str, Any]          # the checkpoint itself, or a renamed view of it
    keymap: Any = None                  # a nodes.checkpoint.KeyMap applied to ``weights``, or None


class ModelNode(Node):
    """A node whose weights come from ``checkpoint`` (or ``random``) in ``dtype``; see the module doc.

    Expects the params ``checkpoint``, ``dtype`` and ``init_seed`` (``nodes.common.params``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model: nn.Module | None = None

    def device_problems(self, device: str) -> list[tuple[str, str, str]]:
        """A model node with an ``attention`` param can't run a backend its device or install lacks."""
        backend = getattr(self.p, "attention", None)
        if backend is None:
            return []
        from .attention import backend_problem
        why = backend_problem(backend, device)
        return [("attention", why, "attention: auto picks the fastest backend installed here")] if why else []

    def facts(self, sources) -> dict:
        """What ``fd viz`` shows before any weight is read: the attention backend this node's forwards will take."""
        used = self.attention_in_use()
        if used == "auto":                                  # off CUDA: torch's SDPA on this device
            used = f"auto → torch SDPA on {self.device}"
        return {"notes": [f"attention: {used}"]} if used else {}

    def attention_in_use(self) -> str | None:
        """The attention backend this node's forwards take (``auto`` resolved on this device, with the measured
        row that decided it), for fd bench and fd viz. Without the node's GPU here: where the pick will be made."""
        backend = getattr(self.p, "attention", None)
        if backend != "auto" or not str(self.device).startswith("cuda"):
            return backend
        if not torch.cuda.is_available():
            return "auto → picked on the GPU from nodes/common/attention_table.py"
        from .attention import auto_backend
        from .attention_table import MEASURED
        device = torch.device(self.device)
        picked = auto_backend(device)
        row = MEASURED.get(tuple(torch.cuda.get_device_capability(device)))
        name = "torch SDPA (cuDNN first)" if picked == "auto" else picked
        return f"auto → {name}" + (f" (measured on {row['device']}, {row['date']})" if row else "")

    # ------------------------------------------------------------------ hooks
    def companions_random(self) -> list[nn.Module]:
        """Modules this node loads next to its main one (FlashVSR's LQ projector), as random-weight modules of
        the configured size; called under ``torch.device("meta")``, so the memory plan can count them."""
        return []

    def build_random(self) -> nn.Module:
        """The module the size params describe; called under ``torch.device("meta")``."""
        raise NotImplementedError(f"{type(self).__name__}.build_random")

    def build_from(self, checkpoint: Mapping[str, Any]) -> Built:
        """The module (built under the meta device) that fits ``checkpoint``, with what to load into it."""
        raise NotImplementedError(f"{type(self).__name__}.build_from")

    def constants(self, module: nn.Module) -> None:
        """Set buffers that are neither weights nor random: random init zeroes them, checkpoints lack them."""

    def finish(self, module: nn.Module) -> nn.Module:
        """Last touches once every tensor is real (tie weights, memory format, compile)."""
        return module

    def loaded(self, module: nn.Module) -> None:
        """Keep the loaded module (a node may wrap it, e.g. in a streaming decoder)."""
        self.model = module

    @property
    def random_weights(self) -> bool:
        return is_random(self.p.checkpoint)

    def open_weights(self) -> Mapping[str, Any]:
        """The checkpoint ``checkpoint`` names, opened lazily (nothing is read yet)."""
        from nodes.checkpoint import open_checkpoint
        return open_checkpoint(self.p.checkpoint)

    # ------------------------------------------------------------------ the recipe
    @property
    def dtype(self) -> torch.dtype:
        return resolve_dtype(self.p.dtype, self.device)

    def estimate_bytes(self) -> int:
        """Parameters of the size params' module (counted on meta) times the dtype's size."""
        return meta_param_count(self.build_random) * dtype_bytes(self.p.dtype, self.device)

    def memory_estimate(self, upstream) -> dict:
        """Weights from the checkpoint's shapes when it is on this machine, else from the size params."""
        from .weight_bytes import weight_estimate
        return weight_estimate(self)

    def load(self, progress: ProgressCallback | None = None) -> None:
        """Build or read the module and keep it; ``progress(label, done, total)`` follows the tensors."""
        self.loaded(self.load_module(progress))

    def load_module(self, progress: ProgressCallback | None = None) -> nn.Module:
        from nodes.checkpoint import CheckpointError, load_into, random_init
        dtype = self.dtype
        if self.random_weights:
            with torch.device("meta"):
                module = self.build_random()
            random_init(module, self.p.init_seed, device=self.device, dtype=dtype)
            self.constants(module)
        else:
            try:
                built = self.build_from(self.open_weights())
                self.constants(built.module)
                with load_progress(f"{self.name} ({self.type_name})", progress) as advance:
                    module = load_into(built.module, built.weights, keymap=built.keymap, device=self.device,
                                       dtype=dtype, progress=advance)
            except CheckpointError as e:
                raise CheckpointError(f"node {self.name!r} ({self.type_name}): {e}") from e
        return self.finish(module).eval().requires_grad_(False)

    def require_model(self) -> nn.Module:
        """The loaded module; a clear error when the engine ran the node before ``load()``."""
        return require_loaded(self, "model")
