"""The runnable examples of docs/sessions.md and docs/memory.md run as written (from a scratch folder)."""
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("doc", ["sessions.md", "memory.md"])
def test_python_example_runs(doc, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / doc).read_text(), re.S)
    runnable = [b for b in blocks if "import engine" in b]
    assert len(runnable) == 1, f"{doc}: one runnable example expected"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    exec(compile(runnable[0], f"{doc} example", "exec"), {})
