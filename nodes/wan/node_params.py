"""Temporary re-export: the shared model-node params now live in ``nodes.common.params``.

Only ``nodes/wan/node_dit.py`` still imports from here (it is being rewritten on another
branch); delete this file once it imports ``nodes.common`` (or subclasses ``ModelNode``).
"""
from nodes.common.params import (checkpoint_param, dtype_bytes, dtype_param, is_random,  # noqa: F401
                                 meta_param_count, resolve_dtype, seed_param)
