"""Spec parsing, overrides, --set, extends, interpolation."""
import pytest

from engine import SpecErrors, load_spec
from engine_fixtures import GOOD, write


def test_parse_nodes_inputs_and_interpolation(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.name == "toy"
    assert list(spec.nodes) == ["enc", "acc", "rec"]
    assert spec.nodes["rec"].is_sink and not spec.nodes["acc"].is_sink
    assert spec.nodes["acc"].params["gain"] == 2.0          # ${inputs.gain} resolved, typed
    assert spec.nodes["enc"].wires == {"prompt": "inputs.prompt"}
    assert spec.where("nodes", "acc", "params").line == 14


def test_dotlist_overrides_and_set_files(tmp_path):
    extra = write(tmp_path, "inputs:\n  prompt: from set file\n", "extra.yaml")
    spec = load_spec(write(tmp_path, GOOD), overrides=["inputs.gain=3.5", "nodes.enc.params.dim=8"],
                     set_files=[extra])
    assert spec.inputs["prompt"] == "from set file"
    assert spec.nodes["acc"].params["gain"] == 3.5          # interpolation sees the override
    assert spec.nodes["enc"].params["dim"] == 8
    assert str(spec.where("nodes", "enc", "params", "dim")).startswith("<override 2")


@pytest.mark.parametrize("override, needle", [
    ("nodes.encoder.type=x", "no node 'encoder'"),
    ("inputs.promt=x", "did you mean prompt"),
    ("nodes.enc.colour=red", "'colour' is not a node field"),
    ("bogus.x=1", "no top-level section 'bogus'"),
    ("no_equals_sign", "must look like key.path=value"),
])
def test_override_naming_something_missing_is_an_error(tmp_path, override, needle):
    with pytest.raises(SpecErrors) as e:
        load_spec(write(tmp_path, GOOD), overrides=[override])
    assert needle in str(e.value)
    assert "<override 1" in str(e.value)


def test_extends_merges_parent_and_keeps_child_locations(tmp_path):
    write(tmp_path, GOOD, "base.yaml")
    child = write(tmp_path, """\
        extends: base.yaml
        name: toy_child
        inputs:
          prompt: child prompt
        nodes:
          acc:
            params: {mode: max}
        """, "child.yaml")
    spec = load_spec(child)
    assert spec.name == "toy_child" and spec.inputs["prompt"] == "child prompt"
    assert spec.nodes["acc"].params == {"gain": 2.0, "mode": "max"}
    assert spec.where("nodes", "acc", "params", "mode").file.endswith("child.yaml")
    assert spec.where("nodes", "enc", "type").file.endswith("base.yaml")


def test_extends_cycle_and_missing_parent(tmp_path):
    write(tmp_path, "extends: b.yaml\nname: a\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\nname: b\n", "b.yaml")
    with pytest.raises(SpecErrors, match="cycle"):
        load_spec(tmp_path / "a.yaml")
    p = write(tmp_path, "extends: nowhere.yaml\n", "c.yaml")
    with pytest.raises(SpecErrors) as e:
        load_spec(p)
    assert e.value.errors[0].location.line == 1 and "nowhere.yaml" in str(e.value)


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    p = write(tmp_path, "name: x\nnodes:\n  a: [1, 2\n")
    with pytest.raises(SpecErrors) as e:
        load_spec(p)
    err = e.value.errors[0]
    assert err.code == "yaml_syntax" and err.location.file == str(p) and err.location.line >= 3


def test_bad_interpolation_names_the_field(tmp_path):
    p = write(tmp_path, GOOD.replace("${inputs.gain}", "${inputs.gian}"))
    with pytest.raises(SpecErrors) as e:
        load_spec(p)
    assert "nodes.acc.params.gain" in str(e.value) and ":14:" in str(e.value)


def test_packaged_spec_resolves_by_bare_name():
    spec = load_spec("preview_cpu")
    assert spec.file.endswith("specs/preview_cpu.yaml")
    with pytest.raises(SpecErrors, match="did you mean preview_cpu"):
        load_spec("preview_cpx")
