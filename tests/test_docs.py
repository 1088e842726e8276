"""The spec examples in docs/spec-format.md are valid specs."""
import re
from pathlib import Path

import pytest

from engine import load_plan

DOC = Path(__file__).resolve().parents[1] / "docs" / "spec-format.md"
EXAMPLES = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)


def test_doc_has_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("i", range(len(EXAMPLES)))
def test_doc_example_validates(tmp_path, i):
    p = tmp_path / f"example{i}.yaml"
    p.write_text(EXAMPLES[i])
    plan = load_plan(p, check_devices=False, cuda_devices=0)
    assert plan.sinks
