"""Node registry: built-ins, third-party entry points, duplicate names."""
import sys
from importlib import metadata
from pathlib import Path

import pytest

from engine import FdError, Node, Registry
from engine.registry import ENTRY_POINT_GROUP

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_node"


def test_entry_point_node_types_are_registered(monkeypatch):
    sys.path.insert(0, str(EXAMPLE))
    try:
        ep = metadata.EntryPoint(name="example", value="fd_example_nodes:node_types", group=ENTRY_POINT_GROUP)
        real = metadata.entry_points
        ours = [e for e in real(group=ENTRY_POINT_GROUP) if e.value.startswith("nodes:")]
        assert ours, "fd's built-ins register through the fd.nodes entry point, like any package"
        monkeypatch.setattr(metadata, "entry_points", lambda group=None, **kw: [ep] + ours if group == ENTRY_POINT_GROUP
                            else real(group=group, **kw))
        reg = Registry.default()
        assert "example.invert" in reg and "sink.mp4" in reg
        monkeypatch.setattr(metadata, "entry_points", lambda group=None, **kw: [ep] if group == ENTRY_POINT_GROUP
                            else real(group=group, **kw))
        with pytest.raises(FdError, match="pip install"):
            Registry.default()
    finally:
        sys.path.remove(str(EXAMPLE))


def test_duplicate_type_names_are_refused():
    class A(Node):
        type_name = "dup.x"

    class B(Node):
        type_name = "dup.x"

    reg = Registry([A])
    with pytest.raises(ValueError, match="registered twice"):
        reg.add(B)


def test_suggestions():
    reg = Registry.default()
    assert "noise.gaussian" in reg.suggest("noise.gausian")
