"""Access to parity goldens.

The root comes from ``FD_GOLDENS`` (default: the copy under ``tests/goldens``),
so another golden set with other shapes runs through the same tests. Tests
derive every shape and config from the case files they read here.
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


def case_dir(name: str) -> Path:
    d = root() / name
    if not (d / "case.json").exists():
        pytest.skip(f"golden case {name!r} not present under {root()}")
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


def variant_params(cases) -> list:
    """pytest params (case, variant) for every variant of every case present; an absent case gives one
    param that skips inside ``case_json``."""
    out = []
    for case in cases:
        try:
            names = sorted(case_json(case)["variants"])
        except BaseException:
            names = [None]
        out += [pytest.param(case, v, id=f"{case}-{v}") for v in names]
    return out


def case_value(cj: dict, variant: dict, key: str, default=None):
    """A variant's value, else the case's config / shapes section, else ``default``."""
    for section in (variant, cj.get("config", {}), cj.get("shapes", {})):
        if key in section:
            return section[key]
    return default
