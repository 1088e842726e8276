"""Access to parity goldens.

The root comes from ``FD_GOLDENS`` (default: the copy under ``tests/goldens``),
so another golden set with other shapes runs through the same tests. Tests
derive every shape, config, variant name and optional file from the case files
they read here.

A case absent from the default copy skips its tests. With ``FD_GOLDENS`` set, the
set is expected to be complete: an absent case fails. A case that is present but
cannot be read is an error either way.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load, load_file

DEFAULT_ROOT = Path(__file__).parent / "goldens"


def root() -> Path:
    return Path(os.environ.get("FD_GOLDENS", DEFAULT_ROOT))


def has_case(name: str) -> bool:
    return (root() / name / "case.json").exists()


def case_dir(name: str) -> Path:
    d = root() / name
    if not has_case(name):
        msg = f"golden case {name!r} not present under {root()}"
        if os.environ.get("FD_GOLDENS"):
            pytest.fail(msg + " (FD_GOLDENS is set: a missing case is a failure)", pytrace=False)
        pytest.skip(msg)
    return d


def case_json(name: str) -> dict:
    return json.loads((case_dir(name) / "case.json").read_text())


def tensors(name: str, file: str) -> dict[str, torch.Tensor]:
    """Load ``file`` of case ``name``; ``x.safetensors`` also finds ``x.safetensors.gz``."""
    d = case_dir(name)
    p = d / file
    if p.exists() and not p.name.endswith(".gz"):
        return load_file(str(p))
    gz = p if p.name.endswith(".gz") else d / (file + ".gz")
    if gz.exists():
        return st_load(gzip.decompress(gz.read_bytes()))
    raise FileNotFoundError(f"{p} (nor {gz}) in golden case {name!r}")


def optional_tensors(name: str, key: str, section: dict) -> dict[str, torch.Tensor] | None:
    """The file ``section[key]`` names (e.g. ``files.debug``, the intermediates that localise a
    mismatch), or None when the case names none or the set does not ship it."""
    file = section.get(key)
    if not file:
        return None
    d = case_dir(name)
    if not ((d / file).exists() or (d / (file + ".gz")).exists()):
        return None
    return tensors(name, file)


def variant_params(cases) -> list:
    """pytest params (case, variant) for every variant of every case present; an absent case gives one
    param (variant None) that skips, or with ``FD_GOLDENS`` set fails, inside ``case_json``. A case that
    is present but unreadable raises here, at collection: an error, not a skip."""
    out = []
    for case in cases:
        names = sorted(case_json(case)["variants"]) if has_case(case) else [None]
        out += [pytest.param(case, v, id=f"{case}-{v}") for v in names]
    return out


def case_value(cj: dict, variant: dict, key: str, default=None):
    """A variant's value, else the case's config / shapes section, else ``default``."""
    for section in (variant, cj.get("config", {}), cj.get("shapes", {})):
        if key in section:
            return section[key]
    return default
