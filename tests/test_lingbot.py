"""LingBot-World camera control vs the lingbot_plucker / lingbot_cam_dit goldens (FD_GOLDENS).

Plücker encoder: every trajectory of the case (interpolated and relative poses, intrinsics, the
folded ray tensor), and the per-block form concatenated over blocks. DiT: one forward with and
without camera; every call of each recorded rollout teacher-forced through the causal-model contract
(our own KV and cross-attention caches), flow and x0 per call, and the local window's final cache.
Every size comes from the case files.
"""
import pytest
import torch
from goldens import case_json, case_value, tensors, variant_params

from nodes.common.causal import StreamSpec
from nodes.lingbot.config import lingbot_config
from nodes.lingbot.plucker import block_rays, frame_counts, plucker_path, resample_poses, translation_scale
from nodes.samplers.unipc import shifted_flow_schedule
from nodes.wan.causal import WanDenoiser
from nodes.wan.dit import WanDiT

PLUCKER, DIT = "lingbot_plucker", "lingbot_cam_dit"


def _trajectories():
    from goldens import has_case
    if not has_case(PLUCKER):
        return [pytest.param(None, id="absent")]
    return [pytest.param(t["index"], id=t["name"]) for t in case_json(PLUCKER)["trajectories"]]


@pytest.mark.parametrize("k", _trajectories())
def test_plucker_trajectory(k):
    cj = case_json(PLUCKER)
    traj = next(t for t in cj["trajectories"] if t["index"] == k)
    ins, outs = tensors(PLUCKER, cj["files"]["inputs"]), tensors(PLUCKER, cj["files"]["outputs"])
    got = plucker_path(ins[f"traj.{k}.poses"], ins[f"traj.{k}.intrinsics"], tuple(cj["image_hw"]),
                       traj["frame_num_requested"], cj["chunk_size"], cj.get("max_area"))
    assert got["emb"].shape[2] == traj["latent_frames"]
    tol = traj["tolerance"]
    for mine, key, t in ((got["c2ws_interp"], "c2ws_interp", tol["c2ws_interp"]),
                         (got["c2ws_relative"], "c2ws_relative", tol["c2ws_relative"]),
                         (got["emb"], "c2ws_plucker_emb", tol["emb"])):
        torch.testing.assert_close(mine, outs[f"traj.{k}.{key}"], atol=t["atol"], rtol=t["rtol"], msg=lambda m: f"{key}: {m}")
    torch.testing.assert_close(got["Ks"], outs[f"traj.{k}.Ks"], atol=0, rtol=0)
    if traj["translation_max_norm_before_normalize"] == 0:
        assert got["emb"][:, :3 * 64].abs().max() == 0  # pure rotation: origins stay exactly 0


@pytest.mark.parametrize("k", _trajectories())
def test_plucker_per_block_equals_whole_path(k):
    """Streaming: each block computed from its own poses, the previous block's last pose and the path's
    translation scale, concatenated, is the whole-path tensor."""
    cj = case_json(PLUCKER)
    traj = next(t for t in cj["trajectories"] if t["index"] == k)
    ins = tensors(PLUCKER, cj["files"]["inputs"])
    poses, K = ins[f"traj.{k}.poses"], ins[f"traj.{k}.intrinsics"]
    hw, chunk = tuple(cj["image_hw"]), cj["chunk_size"]
    whole = plucker_path(poses, K, hw, traj["frame_num_requested"], chunk, cj.get("max_area"))
    used, lat_f = frame_counts(len(poses), traj["frame_num_requested"], chunk)
    lat = torch.from_numpy(resample_poses(poses[:used].double().numpy(), lat_f)).float()
    from nodes.lingbot.plucker import framewise_relative
    scale = translation_scale(framewise_relative(lat.double()))
    blocks, prev = [], None
    for b in range(lat_f // chunk):
        blocks.append(block_rays(lat[b * chunk:(b + 1) * chunk], K, hw, prev, scale, cj.get("max_area")))
        prev = lat[(b + 1) * chunk - 1]
    t = traj["tolerance"]["emb"]
    torch.testing.assert_close(torch.cat(blocks, 2), whole["emb"], atol=t["atol"], rtol=t["rtol"])


def test_plucker_bad_inputs():
    good_p, good_k = torch.eye(4).repeat(9, 1, 1), torch.tensor([[500.0, 500.0, 416.0, 240.0]]).repeat(9, 1)
    with pytest.raises(ValueError, match="poses"):
        plucker_path(torch.eye(4).repeat(9, 1, 1)[:, :3], good_k, (16, 32), 81, 3)
    with pytest.raises(ValueError, match="intrinsics"):
        plucker_path(good_p, good_k.clone().fill_(float("nan")), (16, 32), 81, 3)
    with pytest.raises(ValueError, match="poses"):
        plucker_path(good_p[:5], good_k, (16, 32), 81, 3)  # 5 poses: 2 latent frames, no chunk of 3


def _model():
    cj = case_json(DIT)
    sd = tensors(DIT, cj["files"]["weights"])
    cfg = lingbot_config(cj["model_kwargs"], sd)
    assert cfg.control_type == "cam" and cfg.in_dim == sd["patch_embedding.weight"].shape[1]
    model = WanDiT(cfg)
    model.load_state_dict(sd, strict=True)
    return cj, model.eval()


def test_cam_dit_forward():
    cj, model = _model()
    ins, outs = tensors(DIT, cj["files"]["forward_inputs"]), tensors(DIT, cj["files"]["forward_outputs"])
    tol = cj["tolerance"]["forward"]
    with torch.no_grad():
        cam = model(ins["x"][None], ins["t"], ins["context"][None], y=ins["y"][None], camera=ins["c2ws_plucker_emb"])
        plain = model(ins["x"][None], ins["t"], ins["context"][None], y=ins["y"][None])
    torch.testing.assert_close(cam[0], outs["output"], atol=tol["atol"], rtol=tol["rtol"])
    torch.testing.assert_close(plain[0], outs["output_nocam"], atol=tol["atol"], rtol=tol["rtol"])


def test_plain_wan_has_no_camera_layers():
    cj, model = _model()
    from dataclasses import replace
    plain = WanDiT(replace(model.cfg, control_type=None))
    assert not any("cam" in k or "c2ws" in k for k in plain.state_dict())
    with pytest.raises(ValueError, match="camera"):
        plain.embed_camera(torch.zeros(1, 384, 1, 2, 2))


def _sigmas(cj, var):
    """x0 sigma: the FIRST table entry of the int timestep (argmin); re-noise sigma: the SECOND
    occurrence of a repeated value (index_for_timestep)."""
    timesteps, sigmas = shifted_flow_schedule(1000, case_value(cj, var, "shift", cj["rollout"]["shift"]))

    def x0(t):
        return float(sigmas.double()[(timesteps - int(t)).abs().argmin()])

    def renoise(t):
        idx = (timesteps == int(t)).nonzero().flatten()
        return float(sigmas[idx[1] if len(idx) > 1 else idx[0]])
    return timesteps, x0, renoise


def _stream(cj, model, var, frames):
    cfg = model.cfg
    local = case_value(cj, var, "local_attn_size", -1)
    _, _, h, w = tensors(DIT, cj["files"]["forward_inputs"])["x"].shape
    spec = StreamSpec(frame_shape=(cfg.out_dim, h, w), frames_per_block=cj["shapes"]["chunk_size"],
                      sink_frames=case_value(cj, var, "sink_size", 0),
                      window_frames=None if local == -1 else local, max_frames=frames)
    den = WanDenoiser(model, cfg, torch.float32, "auto")
    assert "camera" in den.block_conditions
    stream = den.open_stream(spec)
    assert stream.cache.k.shape[2] == var["kv_cache_tokens"]
    return stream


@pytest.mark.parametrize("case,variant", variant_params([DIT]))
def test_cam_dit_teacher_forced(case, variant):
    cj, model = _model()
    var = cj["variants"][variant]
    rec, ins = tensors(case, var["record_file"]), tensors(case, cj["files"]["rollout_inputs"])
    frames = ins["y"].shape[1]
    stream = _stream(cj, model, var, frames)
    stream.set_conditions(text=ins["context"][None])
    _, x0_sigma, renoise_sigma = _sigmas(cj, var)
    ft, xt = var["tolerance"]["per_call_flow_pred"], var["tolerance"]["per_call_x0_pred"]
    ft_tokens = cj["shapes"]["frame_tokens"]
    for c in var["calls"]:
        i = c["index"]
        x, t = rec[f"call.{i}.input"], rec[f"call.{i}.timestep"]
        f0 = int(rec[f"call.{i}.current_start"]) // ft_tokens
        f1 = f0 + x.shape[1]
        assert [f0, f1] == c["frames"]
        y, cam = ins["y"][:, f0:f1], ins["c2ws_plucker_emb"][:, :, f0:f1]
        flow = stream.denoise(x.transpose(0, 1)[None], float(t.flatten()[0]), f0,
                              y=y.transpose(0, 1)[None], camera=cam)[0].transpose(0, 1)
        torch.testing.assert_close(flow, rec[f"call.{i}.flow_pred"], atol=ft["atol"], rtol=ft["rtol"],
                                   msg=lambda m: f"call {i} flow: {m}")
        if c["kind"] == "denoise":
            s = x0_sigma(t.flatten()[0])
            assert s == pytest.approx(c["x0_sigma"], abs=1e-7)
            if c.get("renoise_to_timestep") is not None:
                assert renoise_sigma(c["renoise_to_timestep"]) == pytest.approx(c["renoise_sigma"], abs=1e-7)
            x0 = (x.double() - s * flow.double()).float()
            torch.testing.assert_close(x0, rec[f"call.{i}.x0_pred"], atol=xt["atol"], rtol=xt["rtol"],
                                       msg=lambda m: f"call {i} x0: {m}")
    layers = sorted({int(k.split(".")[1]) for k in rec if k.startswith("kv_cache.")})
    for layer in layers:
        k, v = stream.cache.chronological(layer, frames)
        for name, mine in (("k", k), ("v", v)):
            gold = rec[f"kv_cache.{layer}.{name}"]
            assert mine.shape == gold.shape
            torch.testing.assert_close(mine, gold, atol=ft["atol"], rtol=ft["rtol"])


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-keys"])
@pytest.mark.parametrize("case,variant", variant_params([DIT]))
def test_cam_dit_rollout_end_to_end(case, variant, graphs):
    """(B) The AR rollout (nodes/ar ARRollout over the stream, the UniPC int table schedule) from
    rollout_inputs with the recorded draws: every call's input and the final latents. graph-keys: the
    calls go through the graph cache's keyed path (engine.capture.EagerBackend), every key prepared
    with the camera before block 0, as ar.sampler does on CUDA."""
    from nodes.ar.rollout import ARRollout
    from nodes.ar.schedule import ARSchedule
    from nodes.samplers.unipc import UniPCIntTable
    cj, model = _model()
    var = cj["variants"][variant]
    rec, ins = tensors(case, var["record_file"]), tensors(case, cj["files"]["rollout_inputs"])
    chunk, frames = cj["shapes"]["chunk_size"], ins["y"].shape[1]
    table = UniPCIntTable(case_value(cj, var, "shift", cj["rollout"]["shift"]))
    timesteps = cj["rollout"]["timesteps"]
    sched = ARSchedule.build(table, timesteps, warp=False)
    denoise = [c for c in var["calls"] if c["kind"] == "denoise" and c["chunk"] == 0]
    assert [sched.rest.sigma_x0[i] for i in range(len(denoise))] == pytest.approx([c["x0_sigma"] for c in denoise], abs=1e-7)
    assert list(sched.rest.sigma_noise[1:]) == pytest.approx([c["renoise_sigma"] for c in denoise[:-1]], abs=1e-7)
    assert table.timesteps.dtype == torch.int64 and all(t in table.timesteps.tolist() for t in timesteps)
    stream = _stream(cj, model, var, frames)
    stream.set_conditions(text=ins["context"][None])
    n_draws = var["num_draws"]
    noise = rec["draw.0"].transpose(0, 1)[None]
    draws = [rec[f"draw.{k}"].transpose(0, 1)[None] for k in range(1, n_draws)]
    if graphs:
        from engine.capture import EagerBackend, GraphCache
        den = stream.denoiser
        den.graphs = GraphCache(den._core, backend=EagerBackend(), warmup=1)
        with torch.no_grad():
            n = stream.prepare(noise[:, :chunk], y=ins["y"][:, :chunk].transpose(0, 1)[None],
                               camera=ins["c2ws_plucker_emb"][:, :, :chunk])
        assert n > 0 and not stream.cache.k.any()
        eager_before = den.graphs.stats.eager
    seen = []
    roll = ARRollout(stream, sched, chunk, noise, draws=draws, trace=seen.append)
    out = []
    for b in range(frames // chunk):
        sl = slice(b * chunk, (b + 1) * chunk)
        out.append(roll.step(y=ins["y"][:, sl].transpose(0, 1)[None], camera=ins["c2ws_plucker_emb"][:, :, sl]))
    assert roll.num_calls == var["num_calls"] and roll.num_draws == n_draws - 1
    ft = var["tolerance"]["per_call_flow_pred"]
    for tr in seen:
        i = tr.index
        torch.testing.assert_close(tr.x[0].transpose(0, 1), rec[f"call.{i}.input"], atol=ft["atol"], rtol=ft["rtol"],
                                   msg=lambda m: f"call {i} input: {m}")
    if graphs:
        assert den.graphs.stats.eager == eager_before  # no block met an unprepared key
    fl = var["tolerance"]["final_latents"]
    torch.testing.assert_close(torch.cat(out, 1)[0].transpose(0, 1), rec["final_latents"], atol=fl["atol"], rtol=fl["rtol"])


# ---------------------------------------------------------------- nodes and spec

def _camera_node(**params):
    from nodes.lingbot.node import LingBotCameraNode
    return LingBotCameraNode("camera", params)


def _blocks(node, n, inputs=None):
    from engine.node import Step
    state = node.new_state()
    return [node.run(inputs or {}, state, Step(block=b, inputs={}))["camera"] for b in range(n)]


def test_camera_node_streams_the_rollout_camera():
    """lingbot.camera, block by block from each block's poses only, gives the camera tensor upstream's
    generate() fed the DiT for the whole recorded rollout."""
    cj = case_json(DIT)
    ins = tensors(DIT, cj["files"]["rollout_inputs"])
    emb = ins["c2ws_plucker_emb"]
    chunk, (lh, lw) = cj["shapes"]["chunk_size"], emb.shape[-2:]
    node = _camera_node(frames_per_block=chunk, latent_height=lh, latent_width=lw)
    blocks = _blocks(node, emb.shape[2] // chunk, {"poses": ins["poses"], "intrinsics": ins["intrinsics"]})
    torch.testing.assert_close(torch.cat(blocks, 2), emb, atol=5e-4, rtol=5e-4)


def test_camera_node_bad_inputs():
    from engine.errors import FdError
    from engine.node import Step
    K = torch.tensor([[480.0, 480.0, 416.0, 240.0]]).repeat(9, 1)
    poses = torch.eye(4).repeat(9, 1, 1)
    with pytest.raises(FdError, match="shorter than the rollout"):
        _blocks(_camera_node(frames_per_block=3, latent_height=2, latent_width=2), 2, {"poses": poses, "intrinsics": K})
    with pytest.raises(FdError, match="poses must be"):
        _blocks(_camera_node(latent_height=2, latent_width=2), 1, {"poses": poses[:, :3], "intrinsics": K})
    with pytest.raises(FdError, match="intrinsics"):
        _blocks(_camera_node(latent_height=2, latent_width=2), 1, {"poses": poses, "intrinsics": K * float("inf")})
    with pytest.raises(FdError, match="intrinsics"):
        _blocks(_camera_node(latent_height=2, latent_width=2), 1, {"poses": poses, "intrinsics": K[:, :3]})
    with pytest.raises(FdError, match="path"):
        _camera_node(path={"forward": 1.0}, latent_height=2, latent_width=2).run({}, {"scale": None}, Step(0, {}))


def test_described_path_turns_left_and_moves_forward():
    from nodes.lingbot.plucker import described_path
    p = described_path(33, forward=2.0, yaw=30.0)
    assert p.shape == (33, 4, 4)
    heading = p[-1, :3, 2]                      # camera z axis in the world
    assert heading[0] < 0 and torch.isclose(torch.atan2(-heading[0], heading[2]), torch.tensor(0.5236), atol=1e-4)
    steps = (p[1:, :3, 3] - p[:-1, :3, 3]).norm(dim=-1)
    torch.testing.assert_close(steps.sum(), torch.tensor(2.0))


def test_wan_dit_node_loads_native_lingbot_folder(tmp_path):
    """wan.dit reads LingBot's native folder (config.json + safetensors, its key names) as a camera model."""
    from safetensors.torch import save_file
    import json
    from nodes.wan.node_dit import WanDiTNode
    cj, model = _model()
    save_file(tensors(DIT, cj["files"]["weights"]), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(json.loads((__import__("goldens").case_dir(DIT) / cj["files"]["config"]).read_text())))
    node = WanDiTNode("dit", {"checkpoint": str(tmp_path), "text_len": cj["model_kwargs"]["text_len"], "dtype": "fp32"})
    node.load()
    assert node.handle.block_conditions == ("y", "camera")
    assert node.handle.module.cfg == model.cfg
    ins, outs = tensors(DIT, cj["files"]["forward_inputs"]), tensors(DIT, cj["files"]["forward_outputs"])
    with torch.no_grad():
        out = node.handle.module(ins["x"][None], ins["t"], ins["context"][None], y=ins["y"][None],
                                 camera=ins["c2ws_plucker_emb"])
    tol = cj["tolerance"]["forward"]
    torch.testing.assert_close(out[0], outs["output"], atol=tol["atol"], rtol=tol["rtol"])


def _write_png(path, rgb) -> None:
    import av
    with av.open(str(path), "w", format="image2") as c:
        st = c.add_stream("png", rate=1)
        st.width, st.height, st.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
        for p in st.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            c.mux(p)
        for p in st.encode():
            c.mux(p)


def _run_tiny(tmp_path, *overrides):
    import numpy as np
    import engine
    img = tmp_path / "image.png"
    if not img.exists():
        _write_png(img, np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    pipe = engine.load("tiny_lingbot_world", overrides=[f"inputs.image={img}",
                                                        f"sinks.video.params.path={tmp_path / 'out.mp4'}", *overrides])
    pipe.load()
    with pipe.open_session() as s:
        out = [(r.outputs["sampler"]["latent"], r.outputs["camera"]["camera"], r.outputs["decoder"]["pixels"])
               for r in s.stream()]
    assert (tmp_path / "out.mp4").stat().st_size > 0
    return out


def test_tiny_lingbot_world_spec_end_to_end(tmp_path):
    """image + camera path -> MP4 on the CPU; the camera reaches the DiT (another path, other latents; the
    first block, whose poses start at identity either way, differs only through the translation scale)."""
    a = _run_tiny(tmp_path)
    assert len(a) == 3
    for lat, cam, pix in a:
        assert lat.shape[1] == cam.shape[2] == 3 and cam.shape[1] == 384 and torch.isfinite(pix).all()
    b = _run_tiny(tmp_path, "nodes.camera.params.path={frames: 33, forward: 0.5, yaw: -45}")
    assert not torch.allclose(a[-1][0], b[-1][0])
    assert not torch.allclose(a[-1][1], b[-1][1])


@pytest.mark.parametrize("spec", ["lingbot_world_fast", "tiny_lingbot_world"])
def test_spec_schedule_is_upstreams(spec):
    """The specs' steps on the UniPC int table are the recorded rollout's timesteps (when the case uses
    the specs' shift)."""
    import engine
    from nodes.samplers.unipc import UniPCIntTable
    p = dict(engine.load_spec(spec).nodes["sampler"].params)
    cj = case_json(DIT)
    assert p["table"] == "unipc"
    if float(p["shift"]) != float(cj["rollout"]["shift"]):
        pytest.skip("the case was recorded with another shift")
    assert UniPCIntTable(float(p["shift"])).warp(list(p["steps"])).tolist() == [float(t) for t in cj["rollout"]["timesteps"]]


@pytest.mark.parametrize("case,variant", variant_params([DIT]))
def test_ar_sampler_node_schedule_on_the_unipc_table(case, variant):
    """ar.sampler `table: unipc` builds the recorded rollout's per-step sigmas: x0 with the first table
    entry of each int timestep, re-noise with index_for_timestep's (the second of a repeated value)."""
    from nodes.ar.node import ARSamplerNode
    cj = case_json(case)
    var = cj["variants"][variant]
    node = ARSamplerNode("sampler", {"table": "unipc", "steps": cj["rollout"]["timesteps"], "warp": False,
                                     "shift": float(cj["rollout"]["shift"])})
    sched = node._schedule()
    for c in (c for c in var["calls"] if c["kind"] == "denoise"):
        assert sched.rest.t[c["step"]] == float(c["timestep"])
        assert sched.rest.sigma_x0[c["step"]] == pytest.approx(c["x0_sigma"], abs=1e-7)
        if c.get("renoise_to_timestep") is not None:
            assert sched.rest.sigma_noise[c["step"] + 1] == pytest.approx(c["renoise_sigma"], abs=1e-7)
    flow = ARSamplerNode("sampler", {"steps": cj["rollout"]["timesteps"], "warp": False,
                                     "shift": float(cj["rollout"]["shift"])})._schedule()
    assert flow.rest.sigma_x0 != sched.rest.sigma_x0   # the default table is another schedule


def test_camera_node_live_control():
    """Live control (fd serve): W moves forward, the arrow keys turn; each block continues the last pose;
    zero control keeps the camera still (zero origins, the block-0 directions); a snapshot keeps the pose."""
    from engine.node import Step
    node = _camera_node(frames_per_block=3, latent_height=2, latent_width=2, speed=0.5, turn=10.0)
    state = node.new_state()
    still = node.run({"control": [0, 0, 0, 0]}, state, Step(0, {}))["camera"]
    assert still[:, :3 * 64].abs().max() == 0
    fwd = node.run({"control": [1, 0, 0, 0]}, state, Step(1, {}))["camera"]
    origin = fwd[0, :3 * 64].reshape(3, 64, 3, 2, 2)[:, 0, :, 0, 0]   # (o_x, o_y, o_z) per latent frame
    torch.testing.assert_close(origin, torch.tensor([[0.0] * 3, [0.0] * 3, [1.0] * 3]))  # +z, normalised by speed
    assert state["pose"][2, 3] == pytest.approx(1.5)                   # 3 frames at 0.5 m
    saved = node.state_tensors(state)
    right = node.run({"control": [0, 0, 1, 0]}, state, Step(2, {}))["camera"]
    again = node.load_state(node.new_state(), saved)
    torch.testing.assert_close(node.run({"control": [0, 0, 1, 0]}, again, Step(2, {}))["camera"], right)
    assert not torch.allclose(right, still)
    assert right[0, 3 * 64, 0, 0, 0] > still[0, 3 * 64, 0, 0, 0] + 0.1   # d_x of a pixel: turned right, rays swing to +x


def test_tiny_spec_driven_live(tmp_path):
    """The tiny spec with its camera node on the `camera` run input (what fd serve sends): a control change
    between blocks reaches the next block's camera and latents."""
    import numpy as np
    import engine
    live = tmp_path / "live.yaml"
    live.write_text("inputs:\n  camera: [0.0, 0.0, 0.0, 0.0]\n  num_blocks: 2\n"
                    "nodes:\n  camera:\n    in: {control: inputs.camera}\n")
    img = tmp_path / "image.png"
    _write_png(img, np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    runs = []
    for second in ([0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]):
        pipe = engine.load("tiny_lingbot_world", overrides=[f"inputs.image={img}",
                                                            f"sinks.video.params.path={tmp_path / 'o.mp4'}"],
                           set_files=[str(live)])
        pipe.load()
        with pipe.open_session() as s:
            a = s.step()
            s.set_input("camera", second)
            b = s.step()
        runs.append((a.outputs["camera"]["camera"], b.outputs["camera"]["camera"], b.outputs["sampler"]["latent"]))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    assert runs[0][1].abs()[:, :3 * 64].max() == 0 and runs[1][1].abs()[:, :3 * 64].max() > 0
    assert not torch.allclose(runs[0][2], runs[1][2])
