"""`fd exec --resume`: which run inputs the command line changes on top of the saved session's.

A snapshot carries the inputs it was taken with (prompt, seed, ...). On resume those win over the
spec file's, except the ones the user overrode on this command line (``inputs.prompt=...``): that is
how a saved world is continued under a new prompt.
"""
from __future__ import annotations

from typing import Any


def resume_inputs(spec, overrides: list[str]) -> dict[str, Any]:
    """The spec's (resolved) value of every input named by an ``inputs.X=...`` override."""
    names = []
    for o in overrides or ():
        key = o.split("=", 1)[0].strip().lstrip("+~")
        if key.startswith("inputs."):
            names.append(key.split(".")[1])
    return {n: spec.inputs[n] for n in dict.fromkeys(names) if n in spec.inputs}
