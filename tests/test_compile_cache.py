"""The CLI points torch.compile's disk cache at a folder that survives reboots, unless the user chose one."""
import os

from flashdreams_cli.main import main


def test_cli_sets_a_persistent_inductor_cache_unless_chosen(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert main(["validate", "tiny_self_forcing"]) == 0
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / ".cache" / "fd" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert main(["validate", "tiny_self_forcing"]) == 0
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
