"""flashvsr.dit / flashvsr.upscaler: loading real file formats (the golden DiT, a .ckpt projector, a .pth prompt),
one chunk per block, snapshots, and the errors bad input gets."""
import pytest
import torch
from goldens import case_json, tensors

from engine.errors import FdError
from nodes.checkpoint import CheckpointError
from nodes.flashvsr.config import call_frame_start
from nodes.flashvsr.dit import WindowKVCache
from nodes.flashvsr.lq_proj import LQProjConfig, LQProjector
from nodes.flashvsr.node_dit import FlashVSRDiTNode, FlashVSRUpscalerNode, load_prompt

TINY = dict(checkpoint="random", dim=32, ffn_dim=32, num_heads=2, num_layers=1, text_dim=16, prompt_len=4,
            lq_hidden=[8, 8], dtype="fp32", compile="off")


@pytest.fixture(scope="module")
def tiny_model():
    node = FlashVSRDiTNode("dit", TINY)
    node.load()
    return node.run({}, None, None)["model"]


def _video(t, h=128, w=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, t, 3, h, w, generator=g) * 2 - 1


def test_upscaler_runs_chunks_and_matches_the_stream(tiny_model):
    up = FlashVSRUpscalerNode("up", {"kernel": "masked", "local_range": 3, "seed": 5})
    state = up.new_state()
    videos = [_video(25), _video(8, seed=1), _video(8, seed=2)]
    outs = [up.run({"model": tiny_model, "video": v}, state, None)["latent"] for v in videos]
    assert [tuple(o.shape) for o in outs] == [(1, 6, 16, 16, 32), (1, 2, 16, 16, 32), (1, 2, 16, 16, 32)]
    # the same by hand: noise drawn in block order from a generator seeded with the seed
    stream = tiny_model.open_stream(up.settings())
    g = torch.Generator().manual_seed(5)
    for v, o in zip(videos, outs):
        noise = torch.randn(1, 16, stream.latent_frames_next(), 16, 32, generator=g)
        torch.testing.assert_close(stream.step(noise, v.transpose(1, 2)).transpose(1, 2), o)


def test_snapshot_resumes_the_stream(tiny_model):
    up = FlashVSRUpscalerNode("up", {"kernel": "masked", "local_range": 3})
    a = up.new_state()
    for v in (_video(25), _video(8, seed=1), _video(8, seed=2)):
        up.run({"model": tiny_model, "video": v}, a, None)
    values = {k: (t.clone() if isinstance(t, torch.Tensor) else t) for k, t in up.state_tensors(a).items()}
    b = up.load_state(up.new_state(), values)
    nxt = _video(8, seed=3)
    torch.testing.assert_close(up.run({"model": tiny_model, "video": nxt}, b, None)["latent"],
                               up.run({"model": tiny_model, "video": nxt}, a, None)["latent"])


def test_bad_video_gets_clear_errors(tiny_model):
    up = FlashVSRUpscalerNode("up", {"kernel": "masked"})
    with pytest.raises(FdError, match="takes 25 LQ frames"):
        up.run({"model": tiny_model, "video": _video(8)}, up.new_state(), None)
    with pytest.raises(FdError, match="multiples of 128"):
        up.run({"model": tiny_model, "video": _video(25, h=120)}, up.new_state(), None)
    with pytest.raises(FdError, match=r"\[B, T, 3, H, W\]"):
        up.run({"model": tiny_model, "video": torch.zeros(1, 25, 128, 128)}, up.new_state(), None)


def test_real_checkpoint_needs_a_prompt_file():
    node = FlashVSRDiTNode("dit", {"checkpoint": "/nowhere/dit.safetensors"})
    with pytest.raises(FdError, match="posi_prompt.pth"):
        node.preflight({})


def test_load_prompt_refuses_foreign_files(tmp_path):
    bad = tmp_path / "p.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read a prompt embedding"):
        load_prompt(str(bad))
    two = tmp_path / "two.pth"
    torch.save({"a": torch.zeros(1, 2, 3), "b": torch.zeros(1)}, two)
    with pytest.raises(CheckpointError, match="holds 2 tensors"):
        load_prompt(str(two))


def test_loads_the_released_file_formats(tmp_path):
    """The golden DiT (.safetensors), a projector saved as LQ_proj_in.ckpt (torch state dict) and the golden
    context saved as posi_prompt.pth (a bare tensor) load through the node; call 0 then equals the golden."""
    case = "flashvsr_dit_step"
    cj = case_json(case)
    inputs, outputs = tensors(case, cj["files"]["inputs"]), tensors(case, cj["files"]["outputs"])
    dim = cj["model_kwargs"]["dim"]
    proj = LQProjector(LQProjConfig(hidden1=8, hidden2=8, out_dim=dim, layer_num=cj["config"]["lq_layers"]))
    torch.save(proj.state_dict(), tmp_path / "LQ_proj_in.ckpt")
    torch.save(inputs["context"], tmp_path / "posi_prompt.pth")
    from goldens import case_dir
    node = FlashVSRDiTNode("dit", {"checkpoint": str(case_dir(case) / cj["files"]["weights"]),
                                   "lq_proj": str(tmp_path / "LQ_proj_in.ckpt"),
                                   "prompt": str(tmp_path / "posi_prompt.pth"),
                                   "num_heads": cj["model_kwargs"]["num_heads"], "dtype": "fp32", "compile": "off"})
    node.preflight({})
    node.load()
    model = node.run({}, None, None)["model"]
    assert model.lq_proj.cfg.out_dim == dim and model.dit.cfg.num_layers == cj["model_kwargs"]["num_layers"]
    a, b = cj["config"]["latent_slices"][0]
    c = cj["config"]
    with torch.no_grad():
        flow = model.dit.chunk(inputs["noise"][:, :, a:b], model.cross, model.time_terms, call_frame_start(0),
                               WindowKVCache(len(model.dit.blocks), int(c["kv_ratio"])),
                               [inputs[f"call.0.lq_latents.{l}"] for l in range(c["lq_layers"])], kernel="masked",
                               local_range=c["local_range"], topk_ratio=c["topk_ratio"])
    tol = cj["tolerance"]
    torch.testing.assert_close(flow, outputs["call.0.noise_pred"], atol=tol["atol"], rtol=tol["rtol"])


def test_random_sizes_follow_the_params():
    node = FlashVSRDiTNode("dit", TINY)
    assert node.estimate_bytes() > 0
    node.load()
    h = node.handle
    assert (h.dit.cfg.dim, h.dit.cfg.num_layers, h.prompt.shape[1], h.lq_proj.cfg.hidden1) == (32, 1, 4, 8)
