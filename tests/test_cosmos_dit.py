"""Cosmos-Predict2 DiT (MinimalV1LVGDiT) vs the upstream goldens (`cosmos_predict2_dit`), through FD_GOLDENS.

Every size comes from the case: the config from ``model_kwargs`` must equal the one the weights give,
the inputs carry their own shapes. The raw call is checked at every debug intermediate the case offers,
the I2V call (FRAME_REPLACE conditioning, cond/uncond branches, x0 guidance) through ``nodes.cosmos.video2world``.
"""
from __future__ import annotations

import pytest
import torch
from goldens import case_json, tensors

from nodes.cosmos.config import CosmosConfig, native_keys
from nodes.cosmos.model import CosmosDiT

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

CASE = "cosmos_predict2_dit"
NOT_IN_WEIGHTS = ("patch_spatial", "patch_temporal", "concat_padding_mask", "video_condition",
                  "rope_h_extrapolation_ratio", "rope_w_extrapolation_ratio", "rope_t_extrapolation_ratio",
                  "rope_enable_fps_modulation", "base_fps", "timestep_scale")


def _model():
    cj = case_json(CASE)
    raw = tensors(CASE, cj["files"]["weights"])
    sd = native_keys(raw)
    kw = cj["model_kwargs"]
    cfg = CosmosConfig.from_model_kwargs(kw)
    # what no tensor holds comes from the config; every size must come out of the weights the same
    not_in_weights = {k: getattr(cfg, k) for k in NOT_IN_WEIGHTS}
    assert CosmosConfig.from_state_dict(sd, **not_in_weights) == cfg
    if "in_channels_total" in kw:
        assert cfg.in_channels_total == kw["in_channels_total"]
    model = CosmosDiT(cfg)
    model.load_state_dict(sd, strict=True)
    return cj, model.eval()


def test_checkpoint_keys_are_stripped_and_buffers_dropped():
    cj = case_json(CASE)
    raw = tensors(CASE, cj["files"]["weights"])
    raw = {**raw, "net.blocks.0.self_attn.q_norm._extra_state": torch.zeros(1)}
    sd = native_keys(raw)
    assert not any(k.startswith(("net.", "accum_", "pos_embedder")) or k.endswith("_extra_state") for k in sd)
    assert set(sd) == set(CosmosDiT(CosmosConfig.from_model_kwargs(cj["model_kwargs"])).state_dict())


def test_raw_forward_matches_upstream_at_every_intermediate():
    cj, model = _model()
    inp = tensors(CASE, cj["files"]["inputs"])
    out = tensors(CASE, cj["files"]["outputs"])
    dbg = tensors(CASE, cj["files"]["debug"]) if "debug" in cj["files"] else {}
    captured = {}

    def keep(name):
        def hook(mod, args, result):
            if isinstance(result, tuple):
                captured[name], captured[name + ".adaln_lora"] = result
            else:
                captured[name] = result
        return hook

    mods = {"x_embedder_out": model.x_embedder, "t_embedder_out": model.t_embedder,
            "t_embedding_norm_out": model.t_embedding_norm, "final_layer_out": model.final_layer}
    mods.update({f"block_{i}_out": b for i, b in enumerate(model.blocks)})
    hooks = [m.register_forward_hook(keep(n)) for n, m in mods.items()]
    with torch.no_grad():
        y = model(inp["raw.x"], inp["raw.timesteps_B_T"], inp["raw.crossattn_emb"],
                  condition_mask=inp["raw.condition_video_input_mask"], padding_mask=inp["raw.padding_mask"],
                  fps=float(inp["raw.fps"][0]))
    for h in hooks:
        h.remove()
    tol = cj["tolerance"]["raw.output"]
    assert dbg, "the case offers no debug intermediates"
    for name, ref in dbg.items():
        assert name in captured, f"debug tensor {name} has no counterpart"
        torch.testing.assert_close(captured[name], ref, atol=tol["atol"], rtol=tol["rtol"],
                                   msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(y, out["raw.output"], atol=tol["atol"], rtol=tol["rtol"])


def test_i2v_branches_and_guidance_match_upstream():
    from nodes.cosmos.video2world import Video2World

    cj, model = _model()
    inp = tensors(CASE, cj["files"]["inputs"])
    out = tensors(CASE, cj["files"]["outputs"])
    tol = cj["tolerance"]["i2v"]
    vals = cj.get("i2v_values", {})
    gt = inp["i2v.gt_frames"]
    guidance = float(vals.get("guidance", _guidance_from_call_sequence(cj)))
    v2w = Video2World(model, sigma_conditional=_sigma_conditional(vals))
    sigma = inp["i2v.sigma"]
    mask = v2w.condition_mask(gt, num_conditional_frames=_conditional_frames(cj))
    with torch.no_grad():
        branches = {}
        for branch, key in (("cond", "i2v.crossattn_emb"), ("uncond", "i2v.neg_crossattn_emb")):
            rec = v2w.denoise(inp["i2v.xt"], sigma, model.prepare_cross(inp[key]), gt=gt, mask=mask,
                              padding_mask=inp["i2v.padding_mask"], record=True)
            branches[branch] = rec
            for name in ("net_input", "net_timesteps_B_T", "net_output", "x0", "eps"):
                ref = out[f"i2v.{branch}.{name}"]
                torch.testing.assert_close(rec[name].to(ref.dtype), ref, atol=tol["atol"], rtol=tol["rtol"],
                                           msg=lambda m: f"{branch}.{name}: {m}")
        guided = v2w.guide(branches["cond"]["x0"], branches["uncond"]["x0"], guidance)
    scale = 1 + 2 * guidance
    torch.testing.assert_close(guided, out["i2v.guided_x0"], atol=tol["atol"] * scale, rtol=tol["rtol"] * scale)
    if "t_cond" in vals:
        t = branches["cond"]["net_timesteps_B_T"]
        assert abs(float(t[0, 0]) - vals["t_cond"]) < 1e-9


def _conditional_frames(cj: dict) -> int:
    """How many latent frames the i2v call conditions on: ``i2v_values`` when it says, else the call sequence's
    'N conditional latent frame(s)', else 1 (Video2World from an image)."""
    import re

    vals = cj.get("i2v_values", {})
    if "num_conditional_frames" in vals:
        return int(vals["num_conditional_frames"])
    for line in cj["call_sequence"]:
        m = re.search(r"(\d+) conditional latent frame", line)
        if m:
            return int(m.group(1))
    return 1


def _sigma_conditional(vals: dict) -> float:
    """sigma_conditional from t_cond = s / (1 + s) when the case records it (else upstream's 1e-4)."""
    if "t_cond" in vals:
        t = vals["t_cond"]
        return t / (1 - t)
    return 1e-4


def _guidance_from_call_sequence(cj: dict) -> float:
    import re

    for line in cj["call_sequence"]:
        m = re.search(r"guidance (\d+(?:\.\d+)?) here", line)
        if m:
            return float(m.group(1))
    pytest.fail("the case names no guidance")


def test_batched_guidance_equals_two_forwards():
    """cond and uncond as one forward of twice the batch give the guided x0 of two forwards (I2V inputs)."""
    from nodes.cosmos.video2world import Video2World

    cj, model = _model()
    inp = tensors(CASE, cj["files"]["inputs"])
    v2w = Video2World(model)
    with torch.no_grad():
        cond, uncond = model.prepare_cross(inp["i2v.crossattn_emb"]), model.prepare_cross(inp["i2v.neg_crossattn_emb"])
        kw = dict(gt=inp["i2v.gt_frames"], num_conditional_frames=_conditional_frames(cj))
        two = v2w.x0_fn(cond, uncond, 3.0, **kw)(inp["i2v.xt"], inp["i2v.sigma"])
        one = v2w.x0_fn(cond, uncond, 3.0, batched=True, **kw)(inp["i2v.xt"], inp["i2v.sigma"])
    tol = cj["tolerance"]["raw.output"]
    torch.testing.assert_close(one, two, atol=tol["atol"], rtol=tol["rtol"])
    assert not torch.allclose(one, v2w.x0_fn(cond, None, **kw)(inp["i2v.xt"], inp["i2v.sigma"]))


def test_bf16_forward_runs_and_stays_near_the_fp32_golden():
    """bf16 weights and activations (the GPU dtype): every stage keeps its dtype and the output stays within a
    bf16 budget of the golden (2% of its largest value; fp32 tolerances do not apply)."""
    cj, model = _model()
    inp, out = tensors(CASE, cj["files"]["inputs"]), tensors(CASE, cj["files"]["outputs"])
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        y = model(inp["raw.x"], inp["raw.timesteps_B_T"], inp["raw.crossattn_emb"],
                  condition_mask=inp["raw.condition_video_input_mask"], padding_mask=inp["raw.padding_mask"])
    ref = out["raw.output"]
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() <= 0.02 * ref.abs().max()


def test_text2image_layout_has_no_condition_mask_channel():
    """MiniTrainDIT without MinimalV1LVGDiT's mask channel (Text2Image checkpoints): one input channel fewer, and
    the config read back from its weights says so when told video_condition=False."""
    cfg = CosmosConfig.from_model_kwargs(case_json(CASE)["model_kwargs"], video_condition=False)
    model = CosmosDiT(cfg)
    k = cfg.patch_volume
    assert model.x_embedder.proj[1].weight.shape[1] == (cfg.in_channels + int(cfg.concat_padding_mask)) * k
    sd = model.state_dict()
    assert CosmosConfig.from_state_dict(sd, **{n: getattr(cfg, n) for n in NOT_IN_WEIGHTS}) == cfg
    x = torch.randn(1, cfg.in_channels, cfg.patch_temporal, 2 * cfg.patch_spatial, 2 * cfg.patch_spatial)
    with torch.no_grad():
        y = model(x, torch.full((1, 1), 0.5), torch.randn(1, 3, cfg.crossattn_emb_channels))
    assert y.shape == (1, cfg.out_channels) + x.shape[2:]
