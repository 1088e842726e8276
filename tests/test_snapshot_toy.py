"""A model family outside fd (the toy world model) gets session snapshots from its stream's two methods alone."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import engine
from engine import Registry

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_node"
sys.path.insert(0, str(EXAMPLE))
from fd_example_nodes.toy_causal import ToyCausalNode  # noqa: E402

SPEC = EXAMPLE / "specs" / "toy_world.yaml"


def _pipe(tmp_path):
    reg = Registry.default()
    if ToyCausalNode.type_name not in reg:
        reg.add(ToyCausalNode)
    return engine.load(SPEC, overrides=[f"sinks.latents.params.path={tmp_path / 'l.safetensors'}"],
                       registry=reg).load()


def test_toy_world_restore_is_bit_identical(tmp_path):
    pipe = _pipe(tmp_path)
    with pipe.open_session() as s:
        s.step()
        s.step()
        s.snapshot(tmp_path / "toy.fds")
        want = [s.step().outputs["sampler"]["latent"].clone() for _ in range(3)]   # past the 4-frame window
    with _pipe(tmp_path).open_session() as s2:
        s2.restore(tmp_path / "toy.fds")
        got = [s2.step().outputs["sampler"]["latent"].clone() for _ in range(3)]
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
