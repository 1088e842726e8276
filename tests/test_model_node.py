"""The model-node load recipe (nodes.common.model_node) on a toy model, without any real family.

A new family writes only the hooks a toy writes here: the module of the size params, the module
a checkpoint's shapes call for with its key map, and the constants random init would zero.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from engine.errors import FdError
from engine.node import Param
from nodes.checkpoint import CheckpointError, keymap
from nodes.common.model_node import Built, ModelNode
from nodes.common.params import checkpoint_param, dtype_param, seed_param
from nodes.common.progress import load_progress

# The toy's "upstream" checkpoints call its layer ``lin``; the module calls it ``proj``.
UPSTREAM = keymap("toy upstream", [("lin", "proj")])
SCALE = 2.5


class Toy(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.register_buffer("scale", torch.empty(()), persistent=False)  # a constant, in no checkpoint

    def forward(self, x):
        return self.proj(x) * self.scale


class ToyNode(ModelNode):
    type_name = "test.toy"
    params = (checkpoint_param("random", "toy weights"), Param("width", int, 4, "width (random weights)"),
              dtype_param(), seed_param())

    def build_random(self):
        return Toy(self.p.width)

    def build_from(self, checkpoint) -> Built:
        with torch.device("meta"):
            module = Toy(checkpoint.shape("lin.weight")[0])  # the size comes from the file, not the params
        return Built(module, checkpoint, UPSTREAM)

    def constants(self, module) -> None:
        module.scale = torch.tensor(SCALE, device=self.device)


def _toy(**params) -> ToyNode:
    return ToyNode("toy", params, "cpu")


def test_random_weights_are_deterministic_with_constants_restored():
    a, b, c = _toy(), _toy(), _toy(init_seed=1)
    for node in (a, b, c):
        node.load()
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())
    assert a.model.proj.weight.dtype == torch.float32  # auto on CPU
    assert a.model.scale.item() == SCALE               # random init zeroed it; constants() put it back
    torch.testing.assert_close(a.model.proj.weight, b.model.proj.weight, atol=0, rtol=0)
    assert not torch.equal(a.model.proj.weight, c.model.proj.weight)


def test_checkpoint_loads_through_the_key_map_in_the_dtype_with_progress(tmp_path):
    sd = {"lin.weight": torch.randn(6, 6), "lin.bias": torch.randn(6)}
    save_file(sd, tmp_path / "toy.safetensors")
    node = _toy(checkpoint=str(tmp_path / "toy.safetensors"), width=4, dtype="bf16")
    seen = []
    node.load(progress=lambda label, done, total: seen.append((label, done, total)))
    assert node.model.proj.weight.shape == (6, 6)  # read from the file, not width=4
    torch.testing.assert_close(node.model.proj.weight, sd["lin.weight"].to(torch.bfloat16), atol=0, rtol=0)
    assert node.model.scale.item() == SCALE and not node.model.scale.is_meta
    assert not node.model.training
    assert seen[-1] == ("toy (test.toy)", 2, 2) and len(seen) == 2


def test_estimate_bytes_counts_parameters_on_meta():
    assert _toy(width=4).estimate_bytes() == (4 * 4 + 4) * 4
    assert _toy(width=4, dtype="bf16").estimate_bytes() == (4 * 4 + 4) * 2


def test_a_missing_checkpoint_names_the_node(tmp_path):
    node = _toy(checkpoint=str(tmp_path / "nope.safetensors"))
    with pytest.raises(CheckpointError, match=r"node 'toy' \(test.toy\): .*nope\.safetensors"):
        node.load()


def test_a_checkpoint_that_does_not_fit_names_the_node(tmp_path):
    save_file({"lin.weight": torch.randn(3, 3), "lin.bias": torch.randn(3), "other.weight": torch.randn(3)},
              tmp_path / "bad.safetensors")
    fits_not = r"(?s)node 'toy' \(test.toy\): checkpoint does not fit Toy.*other\.weight"
    with pytest.raises(CheckpointError, match=fits_not):
        _toy(checkpoint=str(tmp_path / "bad.safetensors")).load()


def test_running_before_load_is_a_clear_error():
    with pytest.raises(FdError, match="ran before load"):
        _toy().require_model()


def test_no_progress_bar_without_a_console_or_a_callback():
    with load_progress("quiet") as advance:  # pytest captures stderr: not a terminal
        assert advance is None
