"""Finding checkpoints and loading them into model modules.

Every model node goes the same way: ``resolve`` a spec reference (``hf://`` or
a local path) to a file, ``open_checkpoint`` it lazily, rename its keys to the
module's upstream names with a ``KeyMap`` when it is stored in another layout
(diffusers, Self-Forcing), and ``load_into`` a module built on the meta device,
one tensor at a time, so a 14B model never needs a full CPU copy.

``CheckpointError`` is defined before the submodules are imported, because they
all raise it.
"""
from __future__ import annotations

from engine.errors import FdError


class CheckpointError(FdError):
    """A checkpoint cannot be found, read or fitted to its module; the message says how to fix it."""


from .keymaps import KeyMap, apply, invert, keymap  # noqa: E402
from .load import Checkpoint, load_into, open_checkpoint, random_init, read_state_dict  # noqa: E402
from .resolve import parse_hf_ref, resolve  # noqa: E402

__all__ = [
    "CheckpointError", "Checkpoint", "KeyMap", "apply", "invert", "keymap", "load_into",
    "open_checkpoint", "parse_hf_ref", "random_init", "read_state_dict", "resolve",
]
