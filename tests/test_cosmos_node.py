"""`cosmos.dit` + `cosmos.sampler` as nodes: the tiny CPU spec end to end (T2V and I2V), checkpoint loading
through the node (released `net.*` layout in a .pt, variant checks), and the errors bad inputs get."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from goldens import case_dir, case_json, tensors

import engine
from engine.errors import FdError
from nodes.cosmos.config import CosmosConfig
from nodes.cosmos.node import CosmosDiTNode, CosmosSamplerNode

CASE = "cosmos_predict2_dit"


def _run(spec, overrides=(), **inputs):
    pipe = engine.load(spec, overrides=list(overrides))
    pipe.load()
    with pipe.open_session(**inputs) as session:
        block = session.step()
        block.values = dict(session.values)  # session nodes' outputs too
    return pipe, block


def test_tiny_cosmos_runs_end_to_end():
    pipe, block = _run("tiny_cosmos")
    sampler = pipe.plan.spec.nodes["sampler"].params
    latent = block.outputs["sampler"]["latent"]
    frames = (sampler["frames"] - 1) // 4 + 1
    assert latent.shape == (1, frames, 16, sampler["latent_height"], sampler["latent_width"])
    assert torch.isfinite(latent).all() and latent.abs().max() > 0
    pixels = block.outputs["decoder"]["pixels"]
    assert pixels.shape[-2:] == (8 * sampler["latent_height"], 8 * sampler["latent_width"])
    # same seed, same clip; another seed, another clip
    _, again = _run("tiny_cosmos")
    assert torch.equal(again.outputs["sampler"]["latent"], latent)
    _, other = _run("tiny_cosmos", seed=1)
    assert not torch.allclose(other.outputs["sampler"]["latent"], latent)


def _write_png(path, rgb: np.ndarray) -> None:
    import av
    with av.open(str(path), "w", format="image2") as c:
        s = c.add_stream("png", rate=1)
        s.width, s.height, s.pix_fmt = rgb.shape[1], rgb.shape[0], "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
            c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_tiny_cosmos_i2v_keeps_the_image_latent(tmp_path):
    _write_png(tmp_path / "img.png", np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    spec = tmp_path / "tiny_cosmos_i2v.yaml"
    spec.write_text(f"""
name: tiny_cosmos_i2v
extends: tiny_cosmos
nodes:
  image:
    type: image.load
    params: {{path: "{tmp_path / 'img.png'}", height: 64, width: 96}}
    device: cpu
  image_latent:
    type: wan.vae_encode
    in: {{image: image.image}}
    params: {{checkpoint: random, dim: 8, dtype: fp32}}
    device: cpu
  sampler:
    in: {{condition: image_latent.latent}}
    params: {{mode: i2v}}
""")
    pipe, block = _run(spec)
    latent = block.outputs["sampler"]["latent"]
    ref = block.values["image_latent"]["latent"]
    assert ref.shape[1] == 1 and latent.shape[2:] == ref.shape[2:]
    torch.testing.assert_close(latent[:, :1], ref, rtol=0, atol=0)  # FRAME_REPLACE: frame 0 is the image's latent
    assert not torch.allclose(latent[:, 1:2], ref)
    # the same clip without the image differs (the condition reaches the generated frames)
    _, t2v = _run("tiny_cosmos")
    assert not torch.allclose(t2v.outputs["sampler"]["latent"][:, 1:], latent[:, 1:])


# ---------------------------------------------------------------------- errors of bad inputs
def _tiny_dit():
    node = CosmosDiTNode("dit", {"checkpoint": "random", "model_channels": 24, "num_blocks": 1, "num_heads": 2,
                                 "crossattn_emb_channels": 8, "adaln_lora_dim": 4, "dtype": "fp32"}, "cpu")
    node.load()
    return node.run({}, None, None)["model"]


def _sampler(**params):
    base = {"num_steps": 1, "frames": 5, "latent_height": 4, "latent_width": 6}
    return CosmosSamplerNode("sampler", {**base, **params}, "cpu")


def test_i2v_without_an_image_is_refused():
    from engine.node import Step
    with pytest.raises(FdError, match="i2v needs the condition input"):
        _sampler(mode="i2v").run({"model": _tiny_dit(), "text": torch.zeros(1, 3, 8)}, None, Step(0, {}))


def test_condition_of_the_wrong_size_is_refused_with_the_pixel_size():
    from engine.node import Step
    with pytest.raises(FdError, match=r"expected \[B, f, 16, 4, 6\].*48x32 px"):
        _sampler(mode="i2v").run({"model": _tiny_dit(), "text": torch.zeros(1, 3, 8),
                                  "condition": torch.zeros(1, 1, 16, 5, 6)}, None, Step(0, {}))


def test_t2v_with_a_condition_is_refused():
    from engine.node import Step
    with pytest.raises(FdError, match="set mode: i2v"):
        _sampler().run({"model": _tiny_dit(), "text": torch.zeros(1, 3, 8),
                        "condition": torch.zeros(1, 1, 16, 4, 6)}, None, Step(0, {}))


# ---------------------------------------------------------------------- checkpoints through the node
def _golden_pt(tmp_path, extra=None):
    cj = case_json(CASE)
    sd = dict(tensors(CASE, cj["files"]["weights"]))
    sd["net.blocks.0.self_attn.q_norm._extra_state"] = torch.zeros(3, dtype=torch.uint8)  # TE leaves these
    sd.update(extra or {})
    path = tmp_path / "model-tiny.pt"
    torch.save(sd, path)
    return cj, path


def _node_params(cj, path, **over):
    kw = cj["model_kwargs"]
    keys = ("patch_spatial", "patch_temporal", "concat_padding_mask", "rope_h_extrapolation_ratio",
            "rope_w_extrapolation_ratio", "rope_t_extrapolation_ratio", "rope_enable_fps_modulation")
    return {"checkpoint": str(path), "dtype": "fp32", **{k: kw[k] for k in keys}, **over}


@pytest.mark.parametrize("layout", ["pt", "safetensors"])
def test_released_pt_loads_through_the_node_and_matches_upstream(tmp_path, layout):
    """The released .pt layout (a flat dict of net.* tensors, TE _extra_state included) and the golden's own
    safetensors file (opened lazily) both load through the node's recipe."""
    if layout == "pt":
        cj, path = _golden_pt(tmp_path)
    else:
        cj = case_json(CASE)
        path = case_dir(CASE) / cj["files"]["weights"]
    node = CosmosDiTNode("dit", _node_params(cj, path), "cpu")
    node.load()
    model = node.run({}, None, None)["model"]
    assert model.cfg.num_heads == cj["model_kwargs"]["num_heads"]
    inp, out = tensors(CASE, cj["files"]["inputs"]), tensors(CASE, cj["files"]["outputs"])
    with torch.no_grad():
        y = model(inp["raw.x"], inp["raw.timesteps_B_T"], inp["raw.crossattn_emb"],
                  condition_mask=inp["raw.condition_video_input_mask"], padding_mask=inp["raw.padding_mask"])
    tol = cj["tolerance"]["raw.output"]
    torch.testing.assert_close(y, out["raw.output"], atol=tol["atol"], rtol=tol["rtol"])


def test_predict2_checkpoint_in_a_predict25_spec_is_refused(tmp_path):
    cj, path = _golden_pt(tmp_path)
    node = CosmosDiTNode("dit", _node_params(cj, path, variant="predict2.5"), "cpu")
    with pytest.raises(FdError, match="no crossattn_proj.*variant: predict2.5"):
        node.load()


def test_predict25_checkpoint_in_a_predict2_spec_is_refused(tmp_path):
    cj = case_json(CASE)
    width = cj["model_kwargs"]["crossattn_emb_channels"]
    cj, path = _golden_pt(tmp_path, {"net.crossattn_proj.0.weight": torch.zeros(width, 3 * width),
                                     "net.crossattn_proj.0.bias": torch.zeros(width)})
    node = CosmosDiTNode("dit", _node_params(cj, path), "cpu")
    with pytest.raises(FdError, match="has crossattn_proj.*variant: predict2"):
        node.load()


def test_node_defaults_are_the_released_2b_config():
    """cosmos.dit's defaults (random weights, memory estimates, the non-size config of checkpoints) are the
    2B model's config as the case records it."""
    real = case_json(CASE).get("real_2B_config")
    if real is None:
        pytest.skip("the case records no real config")
    cfg = CosmosDiTNode("dit", {}, "cpu").size_config()
    assert cfg == CosmosConfig.from_model_kwargs({**real, "crossattn_emb_channels": cfg.crossattn_emb_channels,
                                                  "mlp_ratio": real.get("mlp_ratio", cfg.mlp_ratio)})


def test_real_i2v_spec_wires_an_image_and_a_predict2_dit():
    plan = engine.load_plan("cosmos_predict2_i2v", check_devices=False)
    dit, sampler = plan.nodes["dit"].build(), plan.nodes["sampler"].build()
    assert dit.p.variant == "predict2" and dit.p.checkpoint.endswith(".pt")
    assert sampler.p.mode == "i2v" and plan.spec.nodes["sampler"].wires.get("condition") == "image_latent.latent"
    lat = (sampler.p.frames - 1) // sampler.p.temporal_compression + 1
    assert lat % dit.p.patch_temporal == 0 and sampler.p.latent_height % dit.p.patch_spatial == 0


def test_a_model_that_is_not_cosmos_is_refused():
    from engine.node import Step
    with pytest.raises(FdError, match="needs a Cosmos DiT"):
        _sampler().run({"model": torch.nn.Linear(2, 2), "text": torch.zeros(1, 3, 8)}, None, Step(0, {}))


def test_mask_channels_that_do_not_fit_the_weights_are_named(tmp_path):
    cj, path = _golden_pt(tmp_path)
    node = CosmosDiTNode("dit", _node_params(cj, path, video_condition=False), "cpu")
    with pytest.raises(FdError, match="video_condition"):
        node.load()
