"""Sinks (MP4 via PyAV, PNG, safetensors), atomic outputs, and the CLI through a subprocess."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import av
import pytest
import torch
from safetensors.torch import load_file

from engine import load_plan
from engine.session import Pipeline


def fd(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "flashdreams_cli.main", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_example_spec_writes_a_readable_mp4(tmp_path):
    out = tmp_path / "v.mp4"
    r = fd("exec", "preview_cpu", "inputs.num_blocks=3", "--out", out, "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["outputs"]["video"] == str(out)
    with av.open(str(out)) as c:
        frames = list(c.decode(video=0))
    # 3 blocks x 3 latent frames x temporal 4, at 8x(8, 12) pixels
    assert len(frames) == 36 and (frames[0].height, frames[0].width) == (64, 96)
    assert not list(tmp_path.glob(".*partial*"))


def test_sinks_write_block_by_block_and_atomically(tmp_path):
    plan = load_plan("preview_cpu", overrides=[
        f"sinks.video.params.path={tmp_path / 'a.mp4'}", "inputs.num_blocks=2"])
    from engine.spec import load_spec
    spec = plan.spec
    spec.raw["sinks"]["png"] = {"type": "sink.png", "in": {"frames": "decoder.pixels"},
                               "params": {"path": str(tmp_path / "frames")}}
    spec.raw["sinks"]["dump"] = {"type": "sink.safetensors", "in": {"tensor": "blend.latent"},
                                "params": {"path": str(tmp_path / "lat.safetensors")}}
    import yaml
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec.raw))
    plan = load_plan(load_spec(p))
    session = Pipeline(plan).open_session()
    r0 = session.step()
    # mid-session: nothing exists under the final names yet, temporaries do
    assert not (tmp_path / "a.mp4").exists() and not (tmp_path / "frames").exists()
    assert list(tmp_path.glob(".a.mp4.partial-*"))
    session.step()
    session.close()
    assert (tmp_path / "a.mp4").exists() and len(list((tmp_path / "frames").glob("*.png"))) == 24
    dump = load_file(str(tmp_path / "lat.safetensors"))
    assert set(dump) == {"block.0", "block.1"}
    torch.testing.assert_close(dump["block.0"], r0.outputs["blend"]["latent"])
    assert not list(tmp_path.glob(".*partial*"))


def test_failed_session_leaves_no_partial_file(tmp_path):
    plan = load_plan("preview_cpu", overrides=[f"sinks.video.params.path={tmp_path / 'b.mp4'}"])
    pipe = Pipeline(plan)
    session = pipe.open_session()
    session.step()
    decoder = pipe.nodes["decoder"]
    decoder.run = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(Exception, match="boom"):
        session.step()
    assert not (tmp_path / "b.mp4").exists() and not list(tmp_path.iterdir())


def test_cli_validate_ok_and_errors_exit_2_without_traceback(tmp_path):
    assert fd("validate", "preview_cpu").returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  n:\n    type: noise.gausian\n    params: {frames: 0}\n")
    r = fd("validate", bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{bad}:3:5: [n.type]" in r.stderr and "noise.gaussian" in r.stderr


def test_cli_nodes(tmp_path):
    r = fd("nodes", "--json")
    assert r.returncode == 0 and "sink.mp4" in json.loads(r.stdout)
    r = fd("nodes", "noise.gaussian", "--json")
    info = json.loads(r.stdout)
    assert info["outputs"][0] == {"name": "latent", "type": "latent", "doc": "noise [B, F, C, H, W]"}
    assert {p["name"] for p in info["params"]} >= {"frames", "channels", "seed"}
    r = fd("nodes", "noise.gausian")
    assert r.returncode == 2 and "did you mean noise.gaussian" in r.stderr


@pytest.mark.parametrize("suffix", [".svg", ".html", ".dot"])
def test_cli_viz_draws_every_node(tmp_path, suffix):
    out = tmp_path / f"p{suffix}"
    r = fd("viz", "preview_cpu", "-o", out)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    for n in ("noise", "blend", "decoder", "video"):
        assert n in text
    if suffix == ".svg":
        root = ET.fromstring(text)
        assert root.tag.endswith("svg")


def test_cli_viz_terminal_tree():
    r = fd("viz", "preview_cpu")
    assert r.returncode == 0 and "every block" in r.stdout and "capture: no" in r.stdout


def test_fd_help_reads_well():
    r = fd("--help")
    assert r.returncode == 0 and "exec" in r.stdout and "examples:" in r.stdout


def test_cli_viz_after_running_shows_node_milliseconds(tmp_path):
    out = tmp_path / "p.svg"
    r = fd("viz", "preview_cpu", "--run", 2, "-o", out, f"sinks.video.params.path={tmp_path / 'v.mp4'}")
    assert r.returncode == 0, r.stderr
    assert "ms/block" in out.read_text()
