"""OmniDreams multi-view (architecture only: no public weights) against the `omnidreams_mv_block` goldens.

Views are folded into the batch (N = B*V samples in (b, v) order), each view has its own self-attention cache
rows, every block's cross-view attention joins all views' tokens of a latent frame, and the view AdaLN terms
come from the camera indices of the case. 1: the single forward (chunk 0, t=1000, image stamped) vs
``single_forward.flow`` (+ block outputs); 2: the 2-chunk rollout through ``ARRollout`` with the recorded draws
vs every chunk's clean latent. Every size, view index, step and tolerance comes from the case."""
from __future__ import annotations

import pytest
import torch
from goldens import case_json, tensors

from nodes.ar.rollout import ARRollout
from nodes.ar.schedule import ARSchedule
from nodes.common.causal import StreamSpec
from nodes.cosmos.config import native_keys
from nodes.omnidreams.causal import OmniDreamsCausal
from nodes.omnidreams.keymap import config_from_state_dict, to_module
from nodes.omnidreams.model import OmniDreamsNet
from nodes.samplers.flow_match import FlowMatchTable

torch.backends.cuda.matmul.allow_tf32 = False
CASE = "omnidreams_mv_block"


def frames(tokens: torch.Tensor, cfg, H: int, W: int) -> torch.Tensor:
    """[B, V, T', h*w, C*kt*kh*kw] -> [B*V, T, C, H, W]."""
    kt, k = cfg.patch_temporal, cfg.patch_spatial
    B, V, Tp = tokens.shape[:3]
    x = tokens.reshape(B * V, Tp, H // k, W // k, -1, kt, k, k)
    return x.permute(0, 1, 5, 4, 2, 6, 3, 7).reshape(B * V, Tp * kt, -1, H, W)


def setup(case):
    cj = case_json(case)
    net, tr = cj["network_config"], cj["transformer_config"]
    sd = dict(native_keys(tensors(case, cj["files"]["checkpoint"])))
    cfg, hd, cams = config_from_state_dict(
        sd, patch_spatial=net.get("patch_spatial", 2), patch_temporal=net.get("patch_temporal", 1),
        concat_padding_mask=net["concat_padding_mask"], timestep_scale=net["timestep_scale"],
        rope_h_extrapolation_ratio=tr.get("h_extrapolation_ratio", 1.0),
        rope_w_extrapolation_ratio=tr.get("w_extrapolation_ratio", 1.0),
        rope_t_extrapolation_ratio=tr.get("t_extrapolation_ratio", 1.0))
    assert (cfg.model_channels, hd, cams) == (net["model_channels"], net["additional_concat_ch"], net["n_cameras_emb"])
    model = OmniDreamsNet(cfg, hd, cams)
    model.load_state_dict(to_module(sd, cfg), strict=True)
    views = [cj["camera_view_mapping"][n] for n in cj["view_names"]]
    assert views == cj["view_indices"] and len(views) == tr["num_views"]
    inp, rec = tensors(case, cj["files"]["inputs"]), tensors(case, cj["files"]["record"])
    B, V, _, C, H, W = inp["image_latent"].shape
    T = tr["len_t"]
    chunks = rec["rollout.final_latents"].shape[2] // T
    spec = StreamSpec(frame_shape=(C, H, W), frames_per_block=T, batch=B * V, window_frames=tr["window_size_t"],
                      max_frames=T * chunks)
    stream = OmniDreamsCausal(model.eval(), views=views).open_stream(spec)
    stream.set_conditions(text=inp["text_embeddings"].flatten(0, 1), image=inp["image_latent"].flatten(0, 1))
    hdmaps = [inp[f"hdmap.{i}"].flatten(0, 1) for i in range(chunks)]
    return cj, model, inp, rec, stream, hdmaps, (T, H, W, chunks)


def test_single_forward():
    cj, model, inp, rec, stream, hdmaps, (T, H, W, _) = setup(CASE)
    tol = {k: cj["single_forward"]["tolerance"][k] for k in ("atol", "rtol")}
    outs = {}
    hooks = [b.cross_view_attn.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
             for i, b in enumerate(model.blocks)]
    x = frames(inp["single_forward.noisy_latent"], model.cfg, H, W)
    with torch.no_grad():
        flow, _, stamped = stream.network_flow(x, 1000.0, 0, hdmaps[0])
    for h in hooks:
        h.remove()
    assert stamped == 1 and sorted(outs) == list(range(len(model.blocks)))
    want = frames(rec["single_forward.flow"], model.cfg, H, W)
    for i, o in outs.items():
        ref = rec.get(f"single_forward.debug.block_{i}_cross_view_attn_out")
        if ref is not None:
            torch.testing.assert_close(o.reshape(ref.shape), ref, **tol, msg=lambda m: f"block {i} cross-view: {m}")
    torch.testing.assert_close(flow, want, **tol)


def test_rollout_with_recorded_draws():
    cj, model, inp, rec, stream, hdmaps, (T, H, W, chunks) = setup(CASE)
    ro = cj["rollout"]
    sch = ro["schedule"]
    table = FlowMatchTable(5.0 if "shift" not in ro else ro["shift"])
    steps = [int(round(1000 - float((table.timesteps - t).abs().argmin()))) for t in sch["denoising_step_list"]]
    plan = ARSchedule.build(table, steps, warp=True, context_noise=sch["context_noise"])
    assert list(plan.rest.t) == pytest.approx(sch["denoising_step_list"], rel=1e-7)
    assert plan.context_sigma_noise == pytest.approx(sch["context_sigma"], rel=1e-7)
    draws = [frames(rec[f"rollout.draw.{k}"], model.cfg, H, W) for k in range(ro["num_draws"])]
    per = ro["num_draws"] // chunks
    roll = ARRollout(stream, plan, T, draws=[d for k, d in enumerate(draws) if k % per])
    tol = {k: ro["tolerance"][k] for k in ("atol", "rtol")}
    with torch.no_grad():
        for c in range(chunks):
            got = roll.step(draws[c * per], hdmap=hdmaps[c])
            want = rec[f"rollout.chunk.{c}.clean_latent"].flatten(0, 1)
            torch.testing.assert_close(got, want, **tol, msg=lambda m: f"chunk {c}: {m}")
