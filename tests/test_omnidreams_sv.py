"""OmniDreams single-view distilled streaming DiT against the `omnidreams_sv_dit` goldens (FD_GOLDENS).

A (teacher-forced): every recorded call's network input, timestep and chunk HD-map through our stream
(its own KV cache: denoise steps and the context pass of a chunk write the same rows, the window evicts
the oldest chunk), compared with ``call.i.flow``. B (end to end): ``ARRollout`` with the ``ar.sampler``
schedule (steps warped with the shift, context pass re-noised to the table sigma of t=128, t=128 passed
unwarped) and the recorded draws, compared with every chunk's clean latent and ``final_latents``.
Every size, step list and tolerance comes from the case."""
from __future__ import annotations

import pytest
import torch
from goldens import case_json, tensors, variant_params

from nodes.ar.rollout import ARRollout
from nodes.ar.schedule import ARSchedule
from nodes.common.causal import StreamSpec
from nodes.cosmos.config import native_keys
from nodes.omnidreams.causal import OmniDreamsCausal
from nodes.omnidreams.keymap import config_from_state_dict, to_module
from nodes.omnidreams.model import OmniDreamsNet
from nodes.samplers.flow_match import FlowMatchTable

torch.backends.cuda.matmul.allow_tf32 = False
CASE = "omnidreams_sv_dit"
PARAMS = variant_params([CASE])


def load_net(cj: dict, var: dict) -> OmniDreamsNet:
    sd = dict(native_keys(tensors(CASE, cj["weights"]["file"])))
    net, tr = cj["network_config"], var["transformer"]
    cfg, hd, cams = config_from_state_dict(
        sd, patch_spatial=net["patch_spatial"], patch_temporal=net["patch_temporal"],
        concat_padding_mask=net["concat_padding_mask"], timestep_scale=net["timestep_scale"],
        rope_h_extrapolation_ratio=tr.get("h_extrapolation_ratio", 1.0),
        rope_w_extrapolation_ratio=tr.get("w_extrapolation_ratio", 1.0),
        rope_t_extrapolation_ratio=tr.get("t_extrapolation_ratio", 1.0))
    assert (cfg.model_channels, cfg.num_blocks, cfg.num_heads, hd) == (
        net["model_channels"], net["num_blocks"], net["num_heads"], net["additional_concat_ch"])
    assert cams == 0
    model = OmniDreamsNet(cfg, hd)
    model.load_state_dict(to_module(sd, cfg), strict=True)
    return model.eval()


def to_frames(tokens: torch.Tensor, cfg, f: int, H: int, W: int) -> torch.Tensor:
    """Golden patchified [B, 1, f'*h*w, C*kt*kh*kw] (tokens (t, h, w), features (c, kt, kh, kw)) -> [B, f, C, H, W]."""
    kt, k = cfg.patch_temporal, cfg.patch_spatial
    B = tokens.shape[0]
    x = tokens.reshape(B, f // kt, H // k, W // k, -1, kt, k, k)
    return x.permute(0, 1, 5, 4, 2, 6, 3, 7).reshape(B, f, -1, H, W)


def setup(case, variant):
    cj = case_json(case)
    var = cj["variants"][variant]
    net = load_net(cj, var)
    inp, rec = tensors(case, cj["inputs"]["file"]), tensors(case, var["record_file"])
    tr = var["transformer"]
    assert tr["num_views"] == 1 and tr["sink_size_t"] == 0
    image = inp["image_latent"][:, 0]                                  # [1, 1, C, H, W]
    C, H, W = image.shape[-3:]
    spec = StreamSpec(frame_shape=(C, H, W), frames_per_block=tr["len_t"], window_frames=tr["window_size_t"],
                      max_frames=tr["len_t"] * tr["chunks"])
    stream = OmniDreamsCausal(net).open_stream(spec)
    stream.set_conditions(text=inp["text_embeddings"][:, 0], image=image)
    hdmaps = [inp[f"hdmap.{i}"][:, 0] for i in range(tr["chunks"])]   # [1, len_t, C_hd, H, W]
    tol = {k: var["tolerance"][k] for k in ("atol", "rtol")}
    return cj, var, net, rec, stream, hdmaps, (C, H, W), tol


@pytest.mark.parametrize("case,variant", PARAMS)
def test_teacher_forced_calls(case, variant):
    cj, var, net, rec, stream, hdmaps, (C, H, W), tol = setup(case, variant)
    T, per_chunk = var["transformer"]["len_t"], var["transformer"]["tokens_per_chunk"]
    assert len(var["calls"]) == var["num_calls"]
    with torch.no_grad():
        for call in var["calls"]:
            i, chunk = call["index"], call["chunk"]
            x = to_frames(rec[f"call.{i}.net_input"], net.cfg, T, H, W)
            flow, _, stamped = stream.network_flow(x, float(rec[f"call.{i}.timestep"]), chunk * T, hdmaps[chunk])
            assert stamped == (1 if call["cond_mask"] == "first_frame_ones" else 0)
            assert stream.cache.plan(chunk * T, T).attend_rows == call["kv_visible_tokens"]
            assert stream.cache.plan(chunk * T, T).attend_rows % per_chunk == 0
            want = to_frames(rec[f"call.{i}.flow"], net.cfg, T, H, W)
            torch.testing.assert_close(flow, want, **tol, msg=lambda m: f"call {i} ({call['kind']}): {m}")



@pytest.mark.parametrize("case,variant", PARAMS)
def test_end_to_end_with_recorded_draws(case, variant):
    cj, var, net, rec, stream, hdmaps, (C, H, W), tol = setup(case, variant)
    T, chunks = var["transformer"]["len_t"], var["transformer"]["chunks"]
    real = cj["real_config"]
    sch = var["schedule"]
    table = FlowMatchTable(real["shift"])
    steps = [int(round(1000 - float((table.timesteps - t).abs().argmin()))) for t in sch["denoising_step_list"]]
    plan = ARSchedule.build(table, steps, warp=True, context_noise=sch["context_noise"])
    assert list(plan.rest.t) == pytest.approx(sch["denoising_step_list"], abs=0, rel=1e-7)
    assert list(plan.rest.sigma_noise) == pytest.approx(sch["denoising_sigmas"], rel=1e-7)
    assert plan.context_t == sch["context_timestep_passed_to_network"]
    assert plan.context_sigma_noise == pytest.approx(sch["context_sigma"], rel=1e-7)
    draws = [to_frames(rec[f"draw.{k}"], net.cfg, T, H, W) for k in range(var["num_draws"])]
    kinds = var["draw_kinds"]
    # upstream's draw order per chunk: initial noise, one re-noise per later step, one context noise;
    # ARRollout's: the block's noise (given to step), re-noises, the context re-noise - the same order
    per = len(plan.rest) + 1
    assert kinds == (["randn"] + ["normal_"] * (per - 1)) * chunks
    initial = [draws[c * per] for c in range(chunks)]
    rest = [d for k, d in enumerate(draws) if k % per]
    seen = []
    roll = ARRollout(stream, plan, T, draws=rest, trace=seen.append)
    with torch.no_grad():
        out = [roll.step(initial[c], hdmap=hdmaps[c]) for c in range(chunks)]
    assert roll.num_draws == len(rest) and roll.num_calls == var["num_calls"]
    image = stream.image
    for call, tr in zip(var["calls"], seen):     # every call's input, in call order
        i = call["index"]
        assert (tr.kind, tr.block, tr.step) == (call["kind"], call["chunk"], call["step"])
        assert float(tr.t.flatten()[0]) == pytest.approx(float(rec[f"call.{i}.timestep"]), rel=1e-7)
        n = image.shape[1] if call["image_injected"] else 0
        seen_by_net = torch.cat([image[:, :n], tr.x[:, n:]], 1)
        torch.testing.assert_close(seen_by_net, to_frames(rec[f"call.{i}.net_input"], net.cfg, T, H, W), **tol,
                                   msg=lambda m: f"call {i} net_input: {m}")
        # scheduler side: upstream stamps the image into the clean latent after the chunk's last step only;
        # our stream's flow keeps the stamped frame at every step. The network never sees the difference
        # (it gets the image there), so only the unstamped frames are compared before the context pass.
        if f"call.{i}.noisy_latent" in rec:
            ref = to_frames(rec[f"call.{i}.noisy_latent"], net.cfg, T, H, W)
            lo = n if call["kind"] == "denoise" and call["step"] else 0
            torch.testing.assert_close(tr.x[:, lo:], ref[:, lo:], **tol, msg=lambda m: f"call {i} noisy: {m}")
    for c, x0 in enumerate(out):
        torch.testing.assert_close(x0, rec[f"chunk.{c}.clean_latent"][:, 0], **tol, msg=lambda m: f"chunk {c}: {m}")
    torch.testing.assert_close(torch.cat(out, 1), rec["final_latents"][:, 0], **tol)
