"""The Cosmos specs: the tiny Predict2.5 pipeline end to end on the CPU; the four real specs (what they point at,
which text encoder feeds which DiT, the offloaded text encoder in the memory plan); gated Hub repositories and
bad inputs get errors that say what to do."""
from __future__ import annotations

import pytest
import torch
from goldens import case_json, tensors

import engine
from engine.errors import FdError
from engine.memory import memory_plan
from nodes.checkpoint import CheckpointError, resolve
from nodes.cosmos.node import CosmosDiTNode
from nodes.cosmos.reason1 import CosmosReason1EncoderNode
from nodes.cosmos.text import CosmosT5EncoderNode

REAL = ("cosmos_predict2_t2v", "cosmos_predict2_i2v", "cosmos_predict25_t2v", "cosmos_predict25_i2v")


def _run(spec, overrides=()):
    pipe = engine.load(spec, overrides=list(overrides))
    pipe.load()
    with pipe.open_session() as session:
        block = session.step()
        block.values = dict(session.values)
    return pipe, block


def test_tiny_predict25_runs_end_to_end(tmp_path):
    pipe, block = _run("tiny_cosmos25", [f"sinks.video.params.path={tmp_path / 'v.mp4'}"])
    p = pipe.plan.spec.nodes["sampler"].params
    latent = block.outputs["sampler"]["latent"]
    dit = pipe.nodes["dit"].model
    assert latent.shape == (1, (p["frames"] - 1) // 4 + 1, dit.cfg.in_channels, 8, 12)
    assert torch.isfinite(latent).all() and (tmp_path / "v.mp4").stat().st_size > 0
    text = block.values["text"]["embeds"]
    assert text.shape[-1] == dit.cfg.crossattn_proj_in_channels == pipe.nodes["text"].feature_width


@pytest.mark.parametrize("spec", REAL)
def test_real_specs_pair_each_dit_with_its_text_encoder(spec):
    plan = engine.load_plan(spec, check_devices=False)
    text = plan.nodes["text"].build()
    dits = [plan.nodes[n].build() for n in plan.order if plan.nodes[n].type_name == "cosmos.dit"]
    samplers = [plan.nodes[n].build() for n in plan.order if plan.nodes[n].type_name == "cosmos.sampler"]
    assert plan.nodes["text"].offload
    for dit in dits:
        cfg = dit.size_config()
        if spec.startswith("cosmos_predict25"):
            assert isinstance(text, CosmosReason1EncoderNode) and dit.p.variant == "predict2.5"
            assert cfg.crossattn_proj_in_channels == text.feature_width and cfg.timestep_scale == 0.001
            assert dit.p.checkpoint.startswith("hf://nvidia/Cosmos-Predict2.5-2B/")
        else:
            assert isinstance(text, CosmosT5EncoderNode) and dit.p.variant == "predict2"
            assert cfg.crossattn_emb_channels == text.p.d_model
            assert dit.p.checkpoint.startswith("hf://nvidia/Cosmos-Predict2-2B-")
    for s in samplers:
        assert s.p.solver == ("unipc" if spec.startswith("cosmos_predict25") else "ab2")
        lat = (s.p.frames - 1) // s.p.temporal_compression + 1
        assert lat in (1, 24) and (s.p.latent_height, s.p.latent_width) == (88, 160)
    wires = {n: plan.spec.nodes[n].wires for n in plan.order if plan.nodes[n].type_name == "cosmos.sampler"}
    assert any("condition" in w for w in wires.values()) == (spec != "cosmos_predict25_t2v")


def test_the_text_encoder_is_offloaded_in_the_memory_plan():
    """Predict2.5's largest part (Cosmos-Reason1, ~13 GiB in bf16) leaves the blocks' peak once it has run."""
    plan = engine.load_plan("cosmos_predict25_i2v", check_devices=False)
    mp = memory_plan(plan, device="h100")
    text = next(n for n in mp.nodes if n.node == "text")
    assert text.offload and text.weights > 12 * 2 ** 30
    sampler = next(n for n in mp.nodes if n.node == "sampler")
    assert sampler.activations > 0 and sampler.state > 0           # the DiT call's bound, text K/V, latents
    kept = memory_plan(engine.load_plan("cosmos_predict25_i2v", overrides=["nodes.text.offload=false"],
                                        check_devices=False), device="h100")
    assert kept.peaks["cuda:0"] - mp.peaks["cuda:0"] > 0.8 * text.weights   # blocks run without it
    assert mp.fits


# ---------------------------------------------------------------------- gated repositories
def _http_response(status: int):
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/nvidia/x"))


@pytest.mark.parametrize("kind", ["gated", "401", "403"])
def test_a_gated_repo_says_accept_the_licence_and_log_in(monkeypatch, kind):
    import huggingface_hub
    from huggingface_hub import errors

    def refuse(**kw):
        if kind == "gated":
            raise errors.GatedRepoError("Access to model nvidia/Cosmos-Predict2.5-2B is restricted",
                                        response=_http_response(401))
        raise errors.HfHubHTTPError(f"{kind} Client Error", response=_http_response(int(kind)))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    ref = "hf://nvidia/Cosmos-Predict2.5-2B/base/post-trained/81edfebe-bd6a-4039-8c1d-737df1a790bf_ema_bf16.pt"
    with pytest.raises(CheckpointError) as e:
        resolve(ref)
    msg = str(e.value)
    assert "accept its licence on https://huggingface.co/nvidia/Cosmos-Predict2.5-2B" in msg
    assert "hf auth login" in msg and "HF_TOKEN" in msg and "hf download nvidia/Cosmos-Predict2.5-2B" in msg
    node = CosmosDiTNode("dit", {"checkpoint": ref, "variant": "predict2.5"}, "cpu")
    with pytest.raises(FdError, match="node 'dit'.*accept its licence"):   # through the node, named
        node.load()


def test_other_http_errors_are_not_called_gated(monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    def fail(**kw):
        raise errors.HfHubHTTPError("500 Server Error", response=_http_response(500))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(errors.HfHubHTTPError):
        resolve("hf://nvidia/Cosmos-Predict2.5-2B/tokenizer.pth")


# ---------------------------------------------------------------------- bad input
def test_i2v_spec_without_an_image_file_is_refused(tmp_path):
    plan = engine.load_plan("cosmos_predict25_i2v", overrides=[f"inputs.image={tmp_path / 'missing.jpg'}"],
                            check_devices=False)
    node = plan.nodes["image"].build()
    with pytest.raises(FdError, match="missing.jpg: no such file"):
        node.run({}, None, None)


def test_i2v_spec_with_the_image_unwired_is_refused(tmp_path):
    """Dropping the condition wire of an I2V sampler leaves mode i2v without its image: refused by name."""
    over = [f"sinks.video.params.path={tmp_path / 'v.mp4'}", "nodes.sampler.params.mode=i2v"]
    with pytest.raises(FdError, match="mode i2v needs the condition input"):
        _run("tiny_cosmos25", over)


def test_predict2_checkpoint_in_the_predict25_spec_is_refused(tmp_path):
    """The Predict2 golden's weights (no crossattn_proj) given to the real Predict2.5 spec's DiT node."""
    cj = case_json("cosmos_predict2_dit")
    path = tmp_path / "model-predict2.pt"
    torch.save(dict(tensors("cosmos_predict2_dit", cj["files"]["weights"])), path)
    kw = cj["model_kwargs"]
    plan = engine.load_plan("cosmos_predict25_i2v", check_devices=False, overrides=[
        f"nodes.dit.params.checkpoint={path}", "nodes.dit.params.dtype=fp32",
        *(f"nodes.dit.params.{k}={kw[k]}" for k in ("patch_spatial", "patch_temporal", "concat_padding_mask"))])
    node = plan.nodes["dit"].build()
    with pytest.raises(FdError, match="no crossattn_proj.*Predict2 checkpoint.*variant: predict2.5"):
        node.load()


def test_an_image_of_another_aspect_is_covered_and_center_cropped_as_upstream(tmp_path):
    """Predict2.5 I2V: image.load fit cover = upstream's resize_input (scale to cover, sizes rounded up, center
    crop). A wide 40x100 image into 16x24: scale 0.4 -> 16x40, columns 8..32 kept; stretch keeps them all."""
    import av
    import numpy as np
    import torch.nn.functional as F

    from nodes.image.node import ImageLoadNode
    rgb = np.random.default_rng(0).integers(0, 256, (40, 100, 3), dtype=np.uint8)
    path = tmp_path / "wide.png"
    with av.open(str(path), "w", format="image2") as c:
        s = c.add_stream("png", rate=1)
        s.width, s.height, s.pix_fmt = 100, 40, "rgb24"
        for p in [*s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")), *s.encode()]:
            c.mux(p)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    cover = ImageLoadNode("i", {"path": str(path), "height": 16, "width": 24, "fit": "cover"}, "cpu")
    got = cover.run({}, None, None)["image"]
    want = F.interpolate(x, size=(16, 40), mode="bilinear", align_corners=False, antialias=True)[..., 8:32]
    torch.testing.assert_close(got, want.clamp(0, 1) * 2 - 1)
    stretch = ImageLoadNode("i", {"path": str(path), "height": 16, "width": 24}, "cpu").run({}, None, None)["image"]
    assert stretch.shape == got.shape and not torch.allclose(stretch, got)
    plan = engine.load_plan("cosmos_predict25_i2v", check_devices=False)
    assert plan.nodes["image"].build().p.fit == "cover"
