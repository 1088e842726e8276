"""Session snapshots (engine/snapshot.py): restore and fork continue a rollout bit for bit; other specs are refused.

The reference is always an uninterrupted rollout of the same pipeline: a snapshot is correct exactly when
nothing the next block depends on was lost, so equality must be exact (rtol = atol = 0) on the CPU.
"""
import json

import pytest
import torch

import engine
from engine.errors import FdError
from engine.node import Node, Port
from engine.types import LATENT

P1, P2, P3 = "a red fox in the snow", "a blue whale in the deep sea", "a city street at night, neon rain"


def _pipe(tmp_path, *extra):
    pipe = engine.load("tiny_self_forcing", overrides=[f"sinks.video.params.path={tmp_path / 'v.mp4'}",
                                                       "inputs.num_blocks=4", *extra])
    return pipe.load()


def _out(result):
    return (result.outputs["sampler"]["latent"].clone(), result.outputs["decoder"]["pixels"].clone())


def _assert_same(a, b):
    for (la, pa), (lb, pb) in zip(a, b, strict=True):
        torch.testing.assert_close(lb, la, rtol=0, atol=0)
        torch.testing.assert_close(pb, pa, rtol=0, atol=0)


WINDOWED = ("inputs.num_blocks=6", "nodes.sampler.params.window_frames=6", "nodes.sampler.params.sink_frames=3",
            "nodes.sampler.params.rope_mode=relative")


@pytest.mark.parametrize("extra, at", [((), 2), (WINDOWED, 4), (("nodes.decoder.type=wan.vae_decode",), 1)],
                         ids=["global-cache-taehv", "window-sink-relative", "wan-vae-decoder"])
def test_restore_in_a_new_pipeline_is_bit_identical(tmp_path, extra, at):
    pipe = _pipe(tmp_path, *extra)
    total = int(pipe.plan.spec.inputs["num_blocks"])
    with pipe.open_session() as s:
        for _ in range(at):
            s.step()
        s.snapshot(tmp_path / "s.fds")
        want = [_out(s.step()) for _ in range(total - at)]
    fresh = _pipe(tmp_path, *extra)          # another load: nothing shared with the first pipeline
    with fresh.open_session() as s2:
        s2.restore(tmp_path / "s.fds")
        assert s2.block == at
        got = [_out(s2.step()) for _ in range(total - at)]
    _assert_same(want, got)


@pytest.mark.parametrize("extra", [("nodes.decoder.type=taehv.decode",), ("nodes.decoder.type=wan.vae_decode",),
                                   ("nodes.decoder.type=wan.vae_decode", "nodes.decoder.params.channels_last=false")],
                         ids=["taehv", "wan-vae", "wan-vae-contiguous"])
def test_snapshot_or_fork_straight_after_a_restore(tmp_path, extra):
    """State restored lazily (on the next block) is still the state a snapshot or fork sees before that block,
    and sessions restored from one in-memory snapshot share no tensor (a decoder updates its caches in place)."""
    pipe = _pipe(tmp_path, *extra)
    with pipe.open_session() as s:
        s.step()
        snap = s.snapshot()
        want = [_out(s.step()) for _ in range(2)]
    with pipe.open_session() as s2:
        s2.restore(snap)
        again = s2.snapshot()
        (child,) = s2.fork(1)
    with pipe.open_session() as s3, child:
        s3.restore(again)
        _assert_same(want, [_out(s3.step()) for _ in range(2)])
        _assert_same(want, [_out(child.step()) for _ in range(2)])
    for _ in range(2):                  # one in-memory snapshot restored twice: the first run must not change it
        with pipe.open_session() as s4:
            s4.restore(snap)
            _assert_same(want, [_out(s4.step()) for _ in range(2)])


def test_header_names_spec_shapes_dtypes(tmp_path):
    from safetensors import safe_open
    pipe = _pipe(tmp_path)
    with pipe.open_session(prompt=P1) as s:
        s.step()
        s.snapshot(tmp_path / "s.fds")
    with safe_open(str(tmp_path / "s.fds"), framework="pt") as f:
        header = json.loads(f.metadata()["fd"])
        keys = set(f.keys())
    assert header["format"] == "fd-session/1" and header["block"] == 1
    assert header["spec"]["name"] == "tiny_self_forcing" and header["inputs"]["prompt"] == P1
    assert set(header["tensors"]) == keys
    assert {"sampler/stream.k", "sampler/stream.v", "sampler/generator", "sampler/noise"} <= keys
    assert any(k.startswith("decoder/memory.") for k in keys)
    k = header["tensors"]["sampler/stream.k"]
    assert k["dtype"] == "float32" and k["shape"][0] == 2          # [layers, batch, rows, heads, head_dim]
    assert header["nodes"]["sampler"]["block_index"] == 1
    assert not any(k.startswith("video/") for k in keys)           # sinks are not saved


def test_fork_three_prompts(tmp_path):
    """Branch 0 equals the unforked run (same prompt switch at the same block); the three branches differ."""
    pipe = _pipe(tmp_path)
    with pipe.open_session(prompt=P1) as s:
        s.step()
        s.step()
        branches = s.fork(3, [{"prompt": P2}, {"prompt": P3}, {"prompt": P1}])
        s.set_input("prompt", P2)
        unforked = [_out(s.step()) for _ in range(2)]
    outs = []
    for b in branches:
        with b:
            outs.append([_out(b.step()) for _ in range(2)])
    _assert_same(unforked, outs[0])
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert not torch.equal(outs[i][-1][0], outs[j][-1][0]), f"branches {i} and {j} agree"


def test_fork_leaves_the_parent_untouched(tmp_path):
    pipe = _pipe(tmp_path)
    with pipe.open_session() as ref:
        want = [_out(ref.step()) for _ in range(3)]
    with pipe.open_session() as s:
        s.step()
        (child,) = s.fork(1)
        with child:
            child.step()
            child.step()
        got = [_out(s.step()) for _ in range(2)]
    _assert_same(want[1:], got)


def test_restore_with_a_new_prompt_equals_a_prompt_switch(tmp_path):
    pipe = _pipe(tmp_path)
    with pipe.open_session(prompt=P1) as s:
        s.step()
        snap = s.snapshot()
        s.set_input("prompt", P3)
        want = [_out(s.step())]
    with pipe.open_session() as s2:
        s2.restore(snap, prompt=P3)
        assert s2.inputs["prompt"] == P3
        _assert_same(want, [_out(s2.step())])


def test_snapshot_of_another_spec_is_refused(tmp_path):
    pipe = _pipe(tmp_path)
    with pipe.open_session() as s:
        s.step()
        s.snapshot(tmp_path / "s.fds")
    bigger = _pipe(tmp_path, "inputs.latent_height=16")
    with bigger.open_session() as s2, pytest.raises(FdError) as e:
        s2.restore(tmp_path / "s.fds")
    msg = str(e.value)
    assert "s.fds" in msg and "nodes.sampler.params.latent_height: 8 in the snapshot, 16 here" in msg
    other = _pipe(tmp_path, "nodes.decoder.type=wan.vae_decode")
    with other.open_session() as s3, pytest.raises(FdError, match="nodes.decoder|node 'decoder'"):
        s3.restore(tmp_path / "s.fds")
    fp16 = _pipe(tmp_path, "nodes.dit.params.dtype=bf16")
    with fp16.open_session() as s4, pytest.raises(FdError, match=r"nodes\.dit\.params\.dtype: 'fp32' in the snapshot"):
        s4.restore(tmp_path / "s.fds")


def test_not_a_snapshot_is_refused(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "junk.fds").write_text("hello")
    pipe = _pipe(tmp_path)
    with pipe.open_session() as s:
        with pytest.raises(FdError, match="no `fd` header"):
            s.restore(tmp_path / "plain.safetensors")
        with pytest.raises(FdError, match="not a session snapshot"):
            s.restore(tmp_path / "junk.fds")
        with pytest.raises(FdError, match="no such session snapshot"):
            s.restore(tmp_path / "missing.fds")


class _Opaque(Node):
    type_name = "test.opaque_state"
    inputs = (Port("latent", LATENT),)
    outputs = (Port("latent", LATENT),)

    def new_state(self):
        return {"count": 0}

    def run(self, inputs, state, step):
        state["count"] += 1
        return {"latent": inputs["latent"]}


def test_node_with_undeclared_state_is_named(tmp_path):
    from engine.registry import Registry
    from engine.runner import read_spec
    reg = Registry.default()
    reg.add(_Opaque)
    extra = tmp_path / "extra.yaml"
    extra.write_text("nodes:\n  extra: {type: test.opaque_state, in: {latent: sampler.latent}}\n")
    spec = read_spec("tiny_self_forcing", [f"sinks.video.params.path={tmp_path / 'v.mp4'}",
                                           "nodes.decoder.in.latent=extra.latent"], [str(extra)], registry=reg)
    pipe = engine.session.Pipeline(engine.plan.make_plan(spec, reg)).load()
    with pipe.open_session() as s:
        s.step()
        with pytest.raises(FdError, match=r"node 'extra' \(test.opaque_state\) cannot be snapshotted"):
            s.snapshot()


LAT_SINK = "sinks:\n  lat:\n    type: sink.safetensors\n    in: {tensor: decoder.pixels}\n    params: {path: lat.st}\n"


def test_cli_save_session_and_resume(tmp_path, monkeypatch, capsys):
    """`fd exec --blocks 2 --save-session` then `--resume --blocks 2` writes the frames of blocks 2-3 of an
    uninterrupted 4-block run, exactly; a resume into another latent size exits 2 naming the field."""
    from safetensors.torch import load_file

    from flashdreams_cli.main import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lat.yaml").write_text(LAT_SINK)

    def fd(*args):
        return main(["exec", "tiny_self_forcing", "--quiet", "--set", "lat.yaml", "--out", "v.mp4", *args])
    assert fd("sinks.lat.params.path=ref.st") == 0
    assert fd("sinks.lat.params.path=a.st", "--blocks", "2", "--save-session", "s.fds") == 0
    capsys.readouterr()
    assert fd("sinks.lat.params.path=b.st", "--blocks", "2", "--resume", "s.fds", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["first_block"] == 2 and summary["resumed_from"] == "s.fds"
    ref, got = load_file("ref.st"), load_file("b.st")
    assert sorted(got) == ["block.2", "block.3"]
    for k in got:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)
    assert fd("--resume", "s.fds", "inputs.latent_height=16") == 2
    assert "latent_height: 8 in the snapshot, 16 here" in capsys.readouterr().err
    assert fd("--resume", "nothing.fds") == 2


def test_resume_inputs_are_only_the_overridden_ones():
    from engine.runner import read_spec
    from flashdreams_cli.session_files import resume_inputs
    spec = read_spec("tiny_self_forcing", ["inputs.prompt=a cat", "nodes.dit.params.dim=64"])
    assert resume_inputs(spec, ["inputs.prompt=a cat", "nodes.dit.params.dim=64"]) == {"prompt": "a cat"}
    assert resume_inputs(spec, []) == {}


def test_cli_a_failed_save_keeps_the_video(tmp_path, monkeypatch, capsys):
    from engine.session import Session
    from flashdreams_cli.main import main
    monkeypatch.chdir(tmp_path)

    def refuse(self, path=None):
        raise FdError("node 'x' (t) cannot be snapshotted")
    monkeypatch.setattr(Session, "snapshot", refuse)
    assert main(["exec", "tiny_self_forcing", "--quiet", "--blocks", "1", "--out", "v.mp4",
                 "--save-session", "s.fds"]) == 2
    assert (tmp_path / "v.mp4").is_file() and not (tmp_path / "s.fds").exists()
    assert "--save-session s.fds: not saved" in capsys.readouterr().err
