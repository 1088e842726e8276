"""tests/goldens.py: an absent case skips only when no golden set was named; errors stay errors."""
import json

import pytest
import torch
from safetensors.torch import save_file

import goldens


def test_absent_case_skips_by_default_and_fails_when_fd_goldens_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("FD_GOLDENS", raising=False)
    monkeypatch.setattr(goldens, "DEFAULT_ROOT", tmp_path)
    with pytest.raises(pytest.skip.Exception):
        goldens.case_json("nowhere")
    assert [p.values for p in goldens.variant_params(["nowhere"])] == [("nowhere", None)]
    monkeypatch.setenv("FD_GOLDENS", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="FD_GOLDENS is set"):
        goldens.case_json("nowhere")


def test_unreadable_case_is_an_error_not_a_skip(tmp_path, monkeypatch):
    monkeypatch.setenv("FD_GOLDENS", str(tmp_path))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "case.json").write_text("{not json")
    with pytest.raises(json.JSONDecodeError):
        goldens.variant_params(["broken"])
    (tmp_path / "broken" / "case.json").write_text(json.dumps({"variants": {"b": {}, "a": {}}}))
    assert [p.values for p in goldens.variant_params(["broken"])] == [("broken", "a"), ("broken", "b")]


def test_optional_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FD_GOLDENS", str(tmp_path))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "case.json").write_text("{}")
    assert goldens.optional_tensors("c", "debug", {}) is None
    assert goldens.optional_tensors("c", "debug", {"debug": None}) is None
    assert goldens.optional_tensors("c", "debug", {"debug": "debug.safetensors"}) is None
    save_file({"x": torch.ones(2)}, str(tmp_path / "c" / "debug.safetensors"))
    assert torch.equal(goldens.optional_tensors("c", "debug", {"debug": "debug.safetensors"})["x"], torch.ones(2))
