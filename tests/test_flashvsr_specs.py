"""The FlashVSR specs: they validate; `fd exec tiny_flashvsr inputs.video=in.mp4` upscales a generated video end
to end on the CPU (as many blocks as the video holds, the input's frame rate and audio kept); bad input ends the
run with a clear message and no output; Self-Forcing -> FlashVSR x2 runs block by block in one DAG."""
from __future__ import annotations

import json
import subprocess
import sys

import av
import pytest
from test_video_input import make_video

import engine
from engine.errors import FdError
from nodes.video.chunks import ChunkSchedule

FD = [sys.executable, "-c", "import sys; from flashdreams_cli.main import main; sys.exit(main())"]
SPECS = ("flashvsr_x4", "flashvsr_x4_fast", "tiny_flashvsr", "self_forcing_vsr", "tiny_self_forcing_vsr")


def fd(*args, cwd, timeout=300):
    return subprocess.run([*FD, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.mark.parametrize("name", SPECS)
def test_flashvsr_specs_validate(name):
    plan = engine.load_plan(name, check_devices=False)
    types = {ns.type for ns in plan.spec.nodes.values()}
    assert {"video.input", "flashvsr.upscaler", "flashvsr.decode", "sink.mp4"} <= types


def test_fast_variant_is_sparser():
    base = engine.load_spec("flashvsr_x4").nodes["upscaler"].params["sparse_ratio"]
    fast = engine.load_spec("flashvsr_x4_fast").nodes["upscaler"].params["sparse_ratio"]
    assert fast < base


def test_tiny_flashvsr_upscales_a_video_end_to_end(tmp_path):
    frames, fps, w, h = 41, 25, 40, 36
    video = make_video(tmp_path / "in.mp4", frames=frames, w=w, h=h, fps=fps)
    out = tmp_path / "out.mp4"
    proc = fd("exec", "tiny_flashvsr", f"inputs.video={video}", "--out", str(out), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sched = ChunkSchedule()
    blocks = sched.blocks_for(frames)
    assert json.loads(proc.stdout)["blocks"] == blocks            # the video's length ended the run
    spec = engine.load_spec("tiny_flashvsr")
    scale = spec.nodes["input"].params["scale"]
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        assert (v.width, v.height) == (int(w * scale) // 128 * 128, int(h * scale) // 128 * 128)
        assert v.average_rate == fps and c.streams.audio
        n = sum(1 for _ in c.decode(v))
    assert n == sched.cond_range(blocks - 1)[1]                    # 21 + 8 per later chunk


def test_bad_video_ends_the_run_with_a_message_and_no_output(tmp_path):
    out = tmp_path / "out.mp4"
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 4096)
    for video, message in ((tmp_path / "missing.mp4", "no such file"), (junk, "cannot be read"),
                           (make_video(tmp_path / "short.mp4", frames=10, audio=False), "needs at least")):
        proc = fd("exec", "tiny_flashvsr", f"inputs.video={video}", "--out", str(out), cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not out.exists() and not list(tmp_path.glob(".out.mp4.partial-*"))
    proc = fd("exec", "tiny_flashvsr", "inputs.video=in.mp4", "nodes.input.params.scale=3.0", "--out", str(out),
              cwd=tmp_path)
    assert proc.returncode == 2 and "scale" in proc.stderr and "Traceback" not in proc.stderr


def test_blocks_requested_beyond_the_video_are_capped(tmp_path):
    video = make_video(tmp_path / "in.mp4", frames=33, audio=False)
    pipe = engine.load("tiny_flashvsr", overrides=[f"inputs.video={video}"])
    pipe.load()
    available = ChunkSchedule().blocks_for(33)
    assert pipe.blocks_available() == available
    assert pipe.blocks_to_run(None) == available and pipe.blocks_to_run(1) == 1
    assert pipe.blocks_to_run(available + 5) == available
    with pipe.open_session() as session:
        assert len(list(session.stream())) == available
        with pytest.raises(FdError, match="run fewer"):
            session.step()


def test_self_forcing_then_flashvsr_in_one_dag(tmp_path):
    """Tiny Self-Forcing's frames (9, then 12 a block) go through FlashVSR x2 as soon as chunks complete."""
    blocks = 4
    out = tmp_path / "vsr.mp4"
    proc = fd("exec", "tiny_self_forcing_vsr", f"inputs.num_blocks={blocks}", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = engine.load_spec("tiny_self_forcing_vsr")
    f = spec.nodes["sampler"].params["frames_per_block"]
    sf_frames = 1 + 4 * (f - 1) + 4 * f * (blocks - 1)
    sched = ChunkSchedule()
    chunks = 0
    while sched.lq_range(chunks)[1] <= sf_frames:                 # no tail padding: the stream has no end
        chunks += 1
    scale = spec.nodes["vsr_input"].params["scale"]
    want_h = int(8 * spec.inputs["latent_height"] * scale) // 128 * 128
    want_w = int(8 * spec.inputs["latent_width"] * scale) // 128 * 128
    with av.open(str(out)) as c:
        v = c.streams.video[0]
        assert (v.height, v.width) == (want_h, want_w)
        assert sum(1 for _ in c.decode(v)) == sched.cond_range(chunks - 1)[1]
    preview = tmp_path / spec.nodes["preview"].params["path"]
    with av.open(str(preview)) as c:
        assert sum(1 for _ in c.decode(video=0)) == sf_frames


def test_upscaler_takes_whole_chunks_back_to_back():
    """A chained source hands the upscaler 0, 1 or 2 chunks a block: the latents equal one chunk per block."""
    import torch

    from nodes.flashvsr.node_dit import FlashVSRDiTNode, FlashVSRUpscalerNode
    dit = FlashVSRDiTNode("dit", dict(checkpoint="random", dim=32, ffn_dim=32, num_heads=2, num_layers=1,
                                      text_dim=16, prompt_len=4, lq_hidden=[8, 8], dtype="fp32", compile="off"))
    dit.load()
    model = dit.run({}, None, None)["model"]
    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, 25 + 8 * 3, 3, 128, 128, generator=g) * 2 - 1
    sched = ChunkSchedule()

    def run(cuts):
        up = FlashVSRUpscalerNode("up", {"kernel": "masked", "local_range": 3, "seed": 3})
        state = up.new_state()
        return [up.run({"model": model, "video": video[:, a:b]}, state, None)["latent"] for a, b in cuts]

    one = run([sched.lq_range(k) for k in range(4)])
    mixed = run([(0, 0), (0, 33), (33, 33), (33, 49)])
    assert [m.shape[1] for m in mixed] == [0, 8, 0, 4]
    torch.testing.assert_close(torch.cat(mixed, 1), torch.cat(one, 1))
    up = FlashVSRUpscalerNode("up", {"kernel": "masked", "local_range": 3})
    with pytest.raises(FdError, match="takes 8 LQ frames, got 5"):
        up.run({"model": model, "video": video[:, :30]}, up.new_state(), None)
