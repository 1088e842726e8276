"""The examples run."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_python_api_example_streams_and_switches_prompt(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "stream_python_api.py")], capture_output=True,
                       text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("block ")]
    assert [x.split(":")[0] for x in lines] == ["block 0", "block 1", "block 2", "block 3"]
