"""`fd exec` under signals, as a subprocess: Ctrl-C writes what was generated as a playable MP4 and says so;
`kill -9` mid-run leaves the old file (or none) at the target, never a partial one; --out into a missing
folder is refused instead of created."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def start(out: Path, blocks: int = 200) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-m", "flashdreams_cli.main", "exec", "tiny_self_forcing",
                             f"inputs.num_blocks={blocks}", "--out", str(out), "--quiet"],
                            cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_partial(out: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    """The sink's temp file appears when the first block reaches it: the run is then mid-stream."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = list(out.parent.glob(f".{out.name}.partial-*"))
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"fd exec ended early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail("no partial output appeared")


def frame_count(path: Path) -> int:
    av = pytest.importorskip("av")
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def test_kill_9_mid_run_leaves_the_old_file(tmp_path):
    out = tmp_path / "x.mp4"
    out.write_bytes(b"the previous, complete video")
    proc = start(out)
    wait_for_partial(out, proc)
    proc.kill()                                           # SIGKILL: no handler, no cleanup runs
    proc.wait(timeout=30)
    assert out.read_bytes() == b"the previous, complete video"


def test_ctrl_c_writes_a_playable_file_of_the_blocks_so_far(tmp_path):
    out = tmp_path / "x.mp4"
    proc = start(out)
    wait_for_partial(out, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "wrote" in err
    n = frame_count(out)
    assert 0 < n < 200 * 12                               # some blocks, not all of them
    assert not list(tmp_path.glob(".x.mp4.partial-*"))


def test_out_into_a_missing_folder_is_refused(tmp_path):
    from flashdreams_cli.main import main
    assert main(["exec", "tiny_self_forcing", "--out", str(tmp_path / "no" / "such" / "x.mp4")]) == 2
    assert not (tmp_path / "no").exists()
