"""Spec-error classes found by mutating the shipped specs (issue 20): each exits 2 and names the user's file:line,
and, when the problem crosses an ``extends:``/``--set`` boundary, the other side too. Run in-process (fast)."""
from __future__ import annotations

import json

import pytest

from flashdreams_cli.main import main


def fd_json(capsys, *argv) -> tuple[int, dict]:
    rc = main([*argv, "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def places(err: dict) -> list[tuple[str, int | None]]:
    return [(err["file"], err["line"])] + [(r["file"], r["line"]) for r in err.get("related", [])]


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_extends_a_file_that_is_not_a_spec_names_the_extends_line(tmp_path, capsys):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    for target in ("/etc/passwd", str(tmp_path / "blob.bin")):
        p = write(tmp_path, "child.yaml", f"name: c\nextends: {target}\n")
        rc, out = fd_json(capsys, "validate", str(p))
        assert rc == 2
        err = out["errors"][0]
        assert err["code"] == "extends_not_a_spec" and "is not a spec" in err["message"]
        assert (err["file"], err["line"]) == (str(p.resolve()), 2)
        assert any(f == target for f, _ in places(err))          # and the target itself


def test_extends_a_mapping_with_no_spec_section_is_not_a_spec(tmp_path, capsys):
    write(tmp_path, "conf.yaml", "colour: red\nsize: 3\n")
    p = write(tmp_path, "child.yaml", "extends: conf.yaml\n")
    rc, out = fd_json(capsys, "validate", str(p))
    assert rc == 2 and out["errors"][0]["code"] == "extends_not_a_spec" and out["errors"][0]["line"] == 1


@pytest.mark.parametrize("child, key, base_line", [
    ("extends: tiny_self_forcing\nnodes: [1, 2]\n", "nodes", 14),
    ("extends: tiny_self_forcing\ninputs:\n  - 3\n", "inputs", 8),
])
def test_list_merged_over_mapping_through_extends_names_both_places(tmp_path, capsys, child, key, base_line):
    p = write(tmp_path, "child.yaml", child)
    rc, out = fd_json(capsys, "validate", str(p))
    assert rc == 2
    err = out["errors"][0]
    assert err["code"] == "incompatible_merge" and err["field"] == key
    assert err["file"] == str(p.resolve()) and err["line"] == 2
    assert any(f.endswith("specs/tiny_self_forcing.yaml") and line == base_line for f, line in places(err))


def test_mapping_merged_over_list_via_set_file_and_dotlist(tmp_path, capsys):
    base = write(tmp_path, "base.yaml", "name: b\ninputs:\n  sizes: [1, 2]\nnodes: {}\n")
    over = write(tmp_path, "over.yaml", "inputs:\n  sizes: {a: 1}\n")
    rc, out = fd_json(capsys, "validate", str(base), "--set", str(over))
    err = out["errors"][0]
    assert rc == 2 and err["code"] == "incompatible_merge"
    assert (err["file"], err["line"]) == (str(over.resolve()), 2)
    assert (str(base.resolve()), 3) in places(err)
    assert any(f.startswith("<--set 1") for f, _ in places(err))      # the chain: how over.yaml came in
    rc, out = fd_json(capsys, "validate", str(base), "inputs.sizes={a: 1}")
    err = out["errors"][0]
    assert rc == 2 and err["code"] == "incompatible_merge" and err["file"].startswith("<override 1")
    assert (str(base.resolve()), 3) in places(err)


def test_no_nodes_has_file_and_line(tmp_path, capsys):
    p = write(tmp_path, "empty.yaml", "name: empty\ndescription: nothing here\n")
    rc, out = fd_json(capsys, "validate", str(p))
    err = out["errors"][0]
    assert rc == 2 and err["code"] == "no_nodes" and err["line"] == 1 and err["file"] == str(p)
    p = write(tmp_path, "listy.yaml", "name: listy\nnodes:\n  - a\n  - b\n")
    rc, out = fd_json(capsys, "validate", str(p))
    codes = {e["code"]: e for e in out["errors"]}
    assert rc == 2 and codes["bad_section"]["line"] == 2


def test_interpolation_broken_by_child_names_child_and_parent_lines(tmp_path, capsys):
    p = write(tmp_path, "child.yaml", "extends: tiny_self_forcing\ninputs: 3\n")
    rc, out = fd_json(capsys, "validate", str(p))
    assert rc == 2
    errs = [e for e in out["errors"] if e["field"] == "nodes.sampler.params.num_blocks"]
    assert errs, out
    err = errs[0]
    assert err["code"] == "bad_interpolation" and (err["file"], err["line"]) == (str(p.resolve()), 2)
    assert any(f.endswith("specs/tiny_self_forcing.yaml") and line for f, line in places(err))


def test_error_in_a_parent_names_the_extends_chain(tmp_path, capsys):
    write(tmp_path, "grand.yaml", "name: g\nnodes:\n  x:\n    type: no.such.type\n")
    write(tmp_path, "parent.yaml", "extends: grand.yaml\n")
    child = write(tmp_path, "child.yaml", "name: c\nextends: parent.yaml\n")
    rc, out = fd_json(capsys, "validate", str(child))
    err = out["errors"][0]
    assert rc == 2 and err["code"] == "unknown_node_type" and err["file"].endswith("grand.yaml")
    chain = places(err)[1:]
    assert (str((tmp_path / "parent.yaml").resolve()), 1) in chain and (str(child.resolve()), 2) in chain


def test_validate_checks_the_spec_not_the_machine(capsys):
    rc, out = fd_json(capsys, "validate", "bench_self_forcing")
    import torch
    if torch.cuda.is_available():
        pytest.skip("this test is about a machine without CUDA")
    assert rc == 0 and out["ok"] and {w["code"] for w in out["warnings"]} == {"unknown_device"}
    assert all(w["line"] for w in out["warnings"])
    rc, out = fd_json(capsys, "validate", "bench_self_forcing", "--here")
    assert rc == 2 and {e["code"] for e in out["errors"]} == {"unknown_device"}


def test_gpu_sized_model_placed_on_cpu_by_auto_warns(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("auto places on the GPU here")
    rc, out = fd_json(capsys, "validate", "self_forcing")
    assert rc == 0
    warned = {w["node"] for w in out["warnings"] if w["code"] == "gpu_model_on_cpu"}
    assert "dit" in warned and all(w["line"] for w in out["warnings"])
    rc, out = fd_json(capsys, "validate", "tiny_self_forcing")
    assert rc == 0 and out["warnings"] == []


def test_validate_takes_several_specs_and_a_yaml_is_never_an_override(tmp_path, capsys):
    bad = write(tmp_path, "bad.yaml", "name: bad\n")
    rc, out = fd_json(capsys, "validate", "tiny_self_forcing", "preview_cpu")
    assert rc == 0 and [s["ok"] for s in out["specs"]] == [True, True]
    rc, out = fd_json(capsys, "validate", "tiny_self_forcing", str(bad))
    assert rc == 2 and [s["ok"] for s in out["specs"]] == [True, False]
    rc, out = fd_json(capsys, "exec", "tiny_self_forcing", str(bad))
    assert rc == 2 and "--set" in out["errors"][0]["hint"]


def test_runtime_error_json_has_the_validation_shape(tmp_path, capsys):
    rc, out = fd_json(capsys, "viz", "tiny_self_forcing", "-o", str(tmp_path / "x.gif"))   # an unknown drawing format
    assert rc == 2 and out["ok"] is False
    assert set(out["errors"][0]) >= {"code", "message", "file", "line", "column", "node", "field", "hint"}


def test_exec_help_names_the_packaged_specs_and_no_missing_flag(capsys):
    with pytest.raises(SystemExit):
        main(["exec", "--help"])
    text = capsys.readouterr().out
    assert "--list" not in text and "tiny_self_forcing" in text


def test_unparsable_interpolation_names_its_line(tmp_path, capsys):
    p = write(tmp_path, "c.yaml", 'extends: tiny_self_forcing\nnodes:\n  text:\n    params:\n      ffn_dim: "${"\n')
    rc, out = fd_json(capsys, "validate", str(p))
    err = out["errors"][0]
    assert rc == 2 and err["code"] == "bad_interpolation" and (err["file"], err["line"]) == (str(p.resolve()), 5)
    rc, out = fd_json(capsys, "validate", "tiny_self_forcing", "inputs.prompt=${")
    assert rc == 2 and out["errors"][0]["file"].startswith("<override 1")


def test_params_in_range_that_build_no_model_are_a_spec_error(capsys):
    rc, out = fd_json(capsys, "validate", "tiny_self_forcing", "nodes.dit.params.dim=1000000000000")
    assert rc == 2
    err = out["errors"][0]
    assert err["code"] == "bad_params" and err["node"] == "dit" and err["line"]
    assert err["file"].endswith("tiny_self_forcing.yaml")
    assert any(f.startswith("<override 1") for f, _ in places(err))


def test_missing_local_checkpoint_is_a_spec_error_with_its_line(tmp_path, capsys):
    p = write(tmp_path, "c.yaml", "extends: tiny_self_forcing\nnodes:\n  dit:\n    params:\n"
                                  "      checkpoint: weights/nowhere.safetensors\n")
    rc, out = fd_json(capsys, "validate", str(p))
    err = out["errors"][0]
    assert rc == 2 and err["code"] == "missing_checkpoint" and err["field"] == "params.checkpoint"
    assert (err["file"], err["line"]) == (str(p.resolve()), 5)
    (tmp_path / "w.safetensors").write_bytes(b"")
    rc, _ = fd_json(capsys, "validate", "tiny_self_forcing", f"nodes.dit.params.checkpoint={tmp_path / 'w.safetensors'}")
    assert rc == 0


@pytest.mark.parametrize("override, code, field", [
    ("sinks.video.type=[1, 2]", "bad_type", "type"),
    ("nodes.dit.type={a: 1}", "bad_type", "type"),
    ("nodes.decoder.params_by_type=x", "bad_params", "params_by_type"),
    ("nodes.decoder.params_by_type.taehv\\.decode=../../etc/passwd", "bad_params", "params_by_type.taehv.decode"),
])
def test_values_of_the_wrong_kind_found_by_the_fuzzer(capsys, override, code, field):
    rc, out = fd_json(capsys, "validate", "tiny_self_forcing", override)
    assert rc == 2
    err = out["errors"][0]
    assert (err["code"], err["field"]) == (code, field) and err["file"].startswith("<override 1")


def test_exec_asks_for_allow_cpu_before_a_gpu_sized_model_on_cpu(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("auto places on the GPU here")
    rc, out = fd_json(capsys, "exec", "self_forcing", "--quiet")      # refused before any weight is fetched
    assert rc == 2 and {e["code"] for e in out["errors"]} == {"gpu_model_on_cpu"}
    assert all("--allow-cpu" in e["hint"] and e["line"] for e in out["errors"])


def test_a_node_no_sink_uses_is_warned_about(tmp_path, capsys):
    p = write(tmp_path, "c.yaml", "extends: tiny_self_forcing\nnodes:\n  spare:\n    type: taehv.decode\n"
                                  "    in: {latent: sampler.latent}\n"
                                  "    params: {checkpoint: random, channels: [32, 16, 16, 16]}\n")
    rc, out = fd_json(capsys, "validate", str(p))
    assert rc == 0
    assert [(w["code"], w["node"], w["line"]) for w in out["warnings"]] == [("unused_node", "spare", 3)]
