"""`video.input`: upstream's frame preparation (bit-exact against the ``flashvsr_lq_proj`` golden), the chunk
schedule (against the goldens' call ranges and upstream's frame-count formula), reading a file chunk by chunk
(against an independent whole-file reference), the frames port, bad input, and `sink.mp4` keeping the audio."""
from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from goldens import case_json, has_case, tensors
from PIL import Image

from engine.errors import FdError
from engine.node import Step
from nodes.sinks.mp4 import Mp4Sink
from nodes.video.chunks import ChunkSchedule
from nodes.video.node import VideoInputNode
from nodes.video.prep import Geometry, geometry, to_signed, upscale_crop


def make_video(path, frames=33, w=40, h=36, fps=24, audio=True, seed=0):
    """A short H.264 MP4 of random frames (+ a sine tone in AAC), written with PyAV."""
    rng = np.random.default_rng(seed)
    c = av.open(str(path), "w")
    s = c.add_stream("libx264", rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    a = None
    if audio:
        a = c.add_stream("aac", rate=16000)
        a.layout = "mono"
    for _ in range(frames):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    if a is not None:
        n = int(16000 * (frames / fps + 0.5))
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 16000)).astype(np.float32)[None]
        af = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        af.sample_rate = 16000
        for p in a.encode(af):
            c.mux(p)
        for p in a.encode():
            c.mux(p)
    c.close()
    return path


def decoded_frames(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


# ---------------------------------------------------------------------------- preparation (golden)
LQ_CASE = "flashvsr_lq_proj"


def test_upscale_crop_is_bit_exact_against_upstream():
    cj = case_json(LQ_CASE)
    inputs = tensors(LQ_CASE, cj["files"]["inputs"])
    lr, want = inputs["lr_frames_u8"].numpy(), inputs["lq_video_u8"].numpy()
    crop, scale = cj["config"]["crop"], float(cj["config"]["scale"])
    geo = geometry(lr.shape[2], lr.shape[1], scale, multiple=1)
    assert (geo.up_w, geo.up_h) == (crop["sW"], crop["sH"])
    geo = Geometry(lr.shape[2], lr.shape[1], scale, crop["sW"], crop["sH"], crop["tW"], crop["tH"])
    got = np.stack([upscale_crop(f, geo) for f in lr])
    assert got.shape == want.shape and np.array_equal(got, want)
    # and the [-1, 1] tensor is the pipeline's, bit for bit
    lq = to_signed(got)
    ref = torch.from_numpy(want).to(torch.float32).permute(3, 0, 1, 2)[None] / 255.0 * 2.0 - 1.0
    assert torch.equal(lq, ref.transpose(1, 2))


def test_geometry_floors_to_the_multiple_and_centres_the_crop():
    g = geometry(321, 181, 4.0)              # 1284 x 724 -> 1280 x 640
    assert (g.up_w, g.up_h, g.out_w, g.out_h, g.left, g.top) == (1284, 724, 1280, 640, 2, 42)
    frame = np.random.default_rng(1).integers(0, 256, (181, 321, 3), dtype=np.uint8)
    up = np.asarray(Image.fromarray(frame).resize((1284, 724), Image.BICUBIC))
    assert np.array_equal(upscale_crop(frame, g), up[42:682, 2:1282])


# ---------------------------------------------------------------------------- chunk schedule
def test_schedule_matches_the_goldens_call_ranges():
    sched = ChunkSchedule()
    cj = case_json(LQ_CASE)
    per_chunk: dict[int, list] = {}
    for call in cj["stream_calls"]:
        per_chunk.setdefault(call["dit_chunk"], []).append(call["lq_frames"])
    for k, ranges in per_chunk.items():
        assert sched.lq_range(k) == (ranges[0][0], ranges[-1][1])
        assert all(r[0] == q[1] for q, r in zip(ranges, ranges[1:]))      # contiguous calls
    if has_case("flashvsr_tcdecoder"):
        dec = case_json("flashvsr_tcdecoder")["config"]["chunks"]
        for k, c in enumerate(dec):
            assert sched.cond_range(k) == tuple(c["lq_frames"])
            assert c["latents"][1] - c["latents"][0] == (sched.first_latents if k == 0 else sched.latents)


def _upstream_chunks(total: int) -> int:
    """infer_flashvsr_*.py: pad 4 copies, cut to the largest 8n+1, then (F - 1) // 8 - 2 DiT calls."""
    n = total + 4
    f = 0 if n < 1 else ((n - 1) // 8) * 8 + 1
    return max(0, (f - 1) // 8 - 2)


def test_blocks_for_matches_upstreams_frame_count_formula():
    sched = ChunkSchedule()
    for total in range(0, 90):
        assert sched.blocks_for(total) == _upstream_chunks(total), total
    assert sched.blocks_for(sched.min_frames) == 1 and sched.blocks_for(sched.min_frames - 1) == 0


# ---------------------------------------------------------------------------- a file, chunk by chunk
def _run_file(path, scale=4.0, blocks=None):
    node = VideoInputNode("video", {"path": str(path), "scale": scale})
    node.preflight({})
    state = node.new_state()
    n = node.blocks_available() if blocks is None else blocks
    outs = [node.run({}, state, Step(block=b, inputs={})) for b in range(n)]
    node.release(state)
    return node, outs


@pytest.mark.parametrize("frames,scale", [(33, 4.0), (46, 2.0)])
def test_file_chunks_equal_a_whole_video_reference(tmp_path, frames, scale):
    path = make_video(tmp_path / "in.mp4", frames=frames, w=72 if scale == 2.0 else 40, h=66 if scale == 2.0 else 36)
    node, outs = _run_file(path, scale)
    sched = ChunkSchedule()
    assert len(outs) == _upstream_chunks(frames)
    # independent reference: every frame decoded up front, upscaled with PIL, 4 copies of the last appended
    raw = decoded_frames(path)
    h, w = raw[0].shape[:2]
    up_w, up_h = round(w * scale), round(h * scale)
    tw, th = up_w // 128 * 128, up_h // 128 * 128
    l, t = (up_w - tw) // 2, (up_h - th) // 2
    prepped = [np.asarray(Image.fromarray(f).resize((up_w, up_h), Image.BICUBIC))[t:t + th, l:l + tw] for f in raw]
    prepped += [prepped[-1]] * 4
    video = torch.from_numpy(np.stack(prepped)).float().permute(0, 3, 1, 2)[None] / 255.0 * 2.0 - 1.0
    for k, out in enumerate(outs):
        a, b = sched.lq_range(k)
        p, q = sched.cond_range(k)
        assert torch.equal(out["lq"], video[:, a:b]) and torch.equal(out["cond"], video[:, p:q])
    src = outs[0]["source"]
    assert src.fps == 24 and src.frames == frames and src.audio and (src.width, src.height) == (w, h)


def test_frames_port_hands_out_whole_chunks_as_they_complete(tmp_path):
    """A world model's decoder feeds 9, then 12 frames a block: blocks carry 0, 1 or 2 chunks, back to back,
    equal to the file path's chunks of the same frames (minus the file's tail padding)."""
    raw = decoded_frames(make_video(tmp_path / "in.mp4", frames=57, audio=False))
    node = VideoInputNode("video", {"path": None, "scale": 4.0})
    node.preflight({"frames": object()})
    state = node.new_state()
    pixels = torch.from_numpy(np.stack(raw)).float().permute(0, 3, 1, 2)[None] / 127.5 - 1.0
    sizes, lq, cond, counts = [9, 12, 12, 12, 12], [], [], []
    start = 0
    for b, n in enumerate(sizes):
        out = node.run({"frames": pixels[:, start:start + n]}, state, Step(block=b, inputs={}))
        start += n
        counts.append(out["lq"].shape[1])
        lq.append(out["lq"])
        cond.append(out["cond"])
    sched = ChunkSchedule()
    # 9, 21, 33, 45, 57 frames in; chunks end at 25, 33, 41, 49, 57: none, none, two, one, two
    assert counts == [0, 0, 25 + 8, 8, 8 * 2]
    _, file_outs = _run_file(tmp_path / "in.mp4", blocks=5)
    assert torch.equal(torch.cat(lq, 1), torch.cat([o["lq"] for o in file_outs], 1))
    assert torch.equal(torch.cat(cond, 1), torch.cat([o["cond"] for o in file_outs], 1))
    assert out["source"].path is None and not out["source"].audio
    assert sched.lq_range(4)[1] == 57


def test_snapshot_resumes_reading_where_it_was(tmp_path):
    path = make_video(tmp_path / "in.mp4", frames=49, audio=False)
    node, outs = _run_file(path)
    state = node.new_state()
    node.run({}, state, Step(block=0, inputs={}))
    values = node.state_tensors(state)
    node.release(state)
    resumed = node.load_state(node.new_state(), values)
    assert torch.equal(node.run({}, resumed, Step(block=1, inputs={}))["lq"], outs[1]["lq"])
    node.release(resumed)


# ---------------------------------------------------------------------------- bad input
def _preflight(path, **params):
    node = VideoInputNode("video", {"path": str(path), **params})
    node.preflight({})
    return node


def test_missing_unreadable_and_empty_files_are_refused(tmp_path):
    with pytest.raises(FdError, match="no such file"):
        _preflight(tmp_path / "nope.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    with pytest.raises(FdError, match="cannot be read"):
        _preflight(junk)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(FdError, match="empty.mp4"):
        _preflight(empty)
    audio_only = tmp_path / "audio.m4a"
    with av.open(str(audio_only), "w", format="mp4") as c:
        a = c.add_stream("aac", rate=16000)
        a.layout = "mono"
        af = av.AudioFrame.from_ndarray(np.zeros((1, 4096), np.float32), format="fltp", layout="mono")
        af.sample_rate = 16000
        for p in list(a.encode(af)) + list(a.encode()):
            c.mux(p)
    with pytest.raises(FdError, match="no video stream"):
        _preflight(audio_only)


def test_zero_frame_video_is_refused(tmp_path):
    path = tmp_path / "zero.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
    with pytest.raises(FdError, match="zero.mp4"):
        _preflight(path)


def test_too_small_too_short_and_bad_scale_are_refused(tmp_path):
    small = make_video(tmp_path / "small.mp4", frames=25, w=30, h=40, audio=False)    # x4: 120 px wide
    with pytest.raises(FdError, match="smaller than one 128x128 block"):
        _preflight(small)
    short = make_video(tmp_path / "short.mp4", frames=ChunkSchedule().min_frames - 1, audio=False)
    with pytest.raises(FdError, match="needs at least"):
        _preflight(short)
    with pytest.raises(FdError, match="scale must be one of"):
        _preflight(short, scale=3.0)
    node = VideoInputNode("video", {"path": None})
    with pytest.raises(FdError, match="no source"):
        node.preflight({})


def test_bad_scale_is_a_spec_error(tmp_path):
    from engine.errors import SpecErrors
    from engine.registry import Registry
    from engine.spec import load_spec
    from engine.validate import validate
    spec = tmp_path / "s.yaml"
    spec.write_text("inputs: {video: in.mp4}\nnodes:\n  video:\n    type: video.input\n"
                    "    params: {path: '${inputs.video}', scale: 3.0}\n")
    errors = validate(load_spec(spec), Registry.default())
    assert [e.code for e in errors] == ["bad_param"] and errors[0].field == "params.scale"
    assert isinstance(SpecErrors(errors), FdError)


# ---------------------------------------------------------------------------- the sink keeps the audio
def test_mp4_sink_keeps_fps_and_audio_cut_to_the_video(tmp_path):
    path = make_video(tmp_path / "in.mp4", frames=41, fps=25)
    _, outs = _run_file(path)
    out = tmp_path / "out.mp4"
    sink = Mp4Sink("video", {"path": str(out), "fps": 16})
    state = sink.new_state()
    for o in outs:
        sink.run({"frames": o["cond"], "source": o["source"]}, state, None)
    assert not out.exists()                                  # nothing under the final name until close
    sink.close(state)
    n_out = sum(o["cond"].shape[1] for o in outs)
    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.average_rate == 25 and a.codec_context.name == "aac"
        frames = sum(1 for _ in c.decode(v))
        c.seek(0)
        audio_end = max(float((p.pts + p.duration) * p.time_base) for p in c.demux(a) if p.pts is not None)
    assert frames == n_out
    video_s = n_out / 25
    assert video_s <= audio_end < video_s + 0.2              # cut at the video's end (one AAC frame of slack)


def test_mp4_sink_without_audio_or_aborted(tmp_path):
    path = make_video(tmp_path / "in.mp4", frames=33)
    _, outs = _run_file(path)
    out = tmp_path / "out.mp4"
    sink = Mp4Sink("video", {"path": str(out), "audio": False})
    state = sink.new_state()
    sink.run({"frames": outs[0]["cond"], "source": outs[0]["source"]}, state, None)
    sink.close(state)
    with av.open(str(out)) as c:
        assert not c.streams.audio
    out2 = tmp_path / "aborted.mp4"
    sink2 = Mp4Sink("video", {"path": str(out2)})
    state = sink2.new_state()
    sink2.run({"frames": outs[0]["cond"], "source": outs[0]["source"]}, state, None)
    sink2.abort(state)
    assert not out2.exists() and not list(tmp_path.glob(".aborted.mp4.partial-*"))
