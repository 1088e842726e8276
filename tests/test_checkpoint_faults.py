"""Bad checkpoint files built on the spot: each is refused with a CheckpointError (exit 2 from the CLI) that
names the file, and a pickle that wants to run code never runs it (weights_only)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from nodes.checkpoint import CheckpointError, read_state_dict


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_truncated_safetensors_names_the_file(tmp_path):
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        read_state_dict(tmp_path / "cut.safetensors")


def test_pickle_that_runs_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"w": _RunsCode(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil\.pth.*weights_only"):
        read_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_sharded_index_pointing_at_a_missing_shard_names_it(tmp_path):
    save_file({"a": torch.zeros(1)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        read_state_dict(tmp_path / "model.safetensors.index.json")


def test_cli_exits_2_on_a_truncated_checkpoint(tmp_path, capsys):
    from flashdreams_cli.main import main
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:100])
    rc = main(["exec", "tiny_self_forcing", f"nodes.dit.params.checkpoint={tmp_path / 'cut.safetensors'}",
               "--blocks", "1", "--quiet", "--out", str(tmp_path / "o.mp4"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 2 and "cut.safetensors" in out["errors"][0]["message"]
    assert not (tmp_path / "o.mp4").exists()
