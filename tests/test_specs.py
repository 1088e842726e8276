"""The packaged specs: every one validates (``fd validate``), decoders swap with one override,
and the tiny CPU spec runs end to end through ``fd exec`` into a readable MP4.

Real-checkpoint specs cannot run here (no weights can be downloaded), so they are
validated and their hf:// references parsed, not executed.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import engine
from engine.spec import packaged_spec_dir
from nodes.checkpoint import parse_hf_ref

SPECS = sorted(packaged_spec_dir().glob("*.yaml"))
DECODERS = ("taehv.decode", "wan.vae_decode")


def _with_decoder(path: Path) -> bool:
    """Specs whose `decoder` node is a model decoder (preview_cpu's is a weight-free preview)."""
    node = engine.load_spec(path).nodes.get("decoder")
    return node is not None and node.type in DECODERS


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_packaged_spec_validates(path):
    plan = engine.load_plan(path, check_devices=False)
    assert plan.order and plan.spec.name == path.stem
    for name, ns in plan.spec.nodes.items():
        ref = ns.params.get("checkpoint")
        if isinstance(ref, str) and ref.startswith("hf://"):
            assert parse_hf_ref(ref).path, f"{path.stem}: {name} names a whole repo, not a file: {ref}"


@pytest.mark.parametrize("path", [p for p in SPECS if _with_decoder(p)],
                         ids=[p.stem for p in SPECS if _with_decoder(p)])
@pytest.mark.parametrize("decoder", DECODERS)
def test_decoder_swaps_with_one_override(path, decoder):
    plan = engine.load_plan(path, overrides=[f"nodes.decoder.type={decoder}"], check_devices=False)
    decoder_node = plan.nodes["decoder"].build()
    assert decoder_node.type_name == decoder
    if not decoder_node.p.checkpoint == "random":  # each decoder gets its own weights
        assert ("taew2_1" in decoder_node.p.checkpoint) == (decoder == "taehv.decode")


def test_specs_needed_by_the_readme_exist():
    names = {p.stem for p in SPECS}
    assert {"tiny_self_forcing", "self_forcing", "self_forcing_long", "causal_forcing_chunkwise",
            "causal_forcing_framewise", "causal_forcing_i2v", "wan21_t2v_1.3b", "wan21_i2v_14b",
            "bench_self_forcing"} <= names


def test_tiny_self_forcing_runs_through_fd_exec(tmp_path):
    import av

    out = tmp_path / "tiny.mp4"
    blocks = 2
    cmd = [sys.executable, "-c", "import sys; from flashdreams_cli.main import main; sys.exit(main())",
           "exec", "tiny_self_forcing", f"inputs.num_blocks={blocks}", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    spec = engine.load_spec("tiny_self_forcing", overrides=[f"inputs.num_blocks={blocks}"])
    f = spec.nodes["sampler"].params["frames_per_block"]
    want_frames = 1 + 4 * (f - 1) + 4 * f * (blocks - 1)  # first block 1+4(f-1), then 4f per block
    want_h, want_w = 8 * spec.inputs["latent_height"], 8 * spec.inputs["latent_width"]
    with av.open(str(out)) as c:
        stream = c.streams.video[0]
        assert (stream.height, stream.width) == (want_h, want_w)
        assert sum(1 for _ in c.decode(video=0)) == want_frames
