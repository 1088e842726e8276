"""Causal Wan 2.2 A14B (two experts) vs FastVideo's CausalDMDDenosingStage (golden causal_wan22_moe).

A: every recorded expert call replayed in order (teacher-forced) through our two experts' streams,
   their own self-attention caches and the one text cache filled by the high-noise expert.
B: the whole rollout (ARRollout with the boundary schedule, the recorded draws) vs final_latents.
Every size, step list, shift, boundary and block layout comes from the case files (FD_GOLDENS).
"""
import pytest
import torch
from wan22_case import experts, fv, inputs_and_record, open_stream, schedule

from nodes.ar.rollout import ARRollout

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
EXPERT_INDEX = {"high_noise": 0, "low_noise": 1}


def _close(mine, ref, tol, what):
    torch.testing.assert_close(mine, ref, atol=tol["atol"], rtol=tol["rtol"], msg=lambda m: f"{what}: {m}")


def test_schedule_matches_case():
    cj, _, _ = inputs_and_record()
    sched = schedule(cj)
    assert sched.rest.t == pytest.approx(cj["schedule"]["warped_timesteps"], abs=1e-4)
    assert sched.boundary.sigma_noise == pytest.approx(cj["schedule"]["sigma_boundary"], abs=1e-7)
    high = [t for t in sched.rest.t if sched.boundary.is_high(t)]
    assert len(high) == cj["schedule"]["num_high_noise_steps"]
    assert len(sched.rest.t) - len(high) == cj["schedule"]["num_low_noise_steps"]
    for c in cj["calls"]:
        if c["kind"] == "denoise":
            assert sched.rest.t[c["step"]] == pytest.approx(c["timestep_value"], abs=1e-4)


def test_teacher_forced_per_call():
    cj, inp, rec = inputs_and_record()
    model, sched, tol = experts(), schedule(cj), cj["tolerance"]
    stream = open_stream(model, cj, inp["latents"])
    stream.set_conditions(text=inp["prompt_embeds"])
    bound = sched.boundary
    for c in cj["calls"]:
        i = c["index"]
        x = rec[f"call.{i}.input"].transpose(1, 2)             # BCTHW -> BTCHW
        t = float(rec[f"call.{i}.timestep"].flatten()[0])
        assert x.shape[1] == c["num_frames"]
        s = stream.streams[EXPERT_INDEX[c["expert"]]]
        if c["kind"] == "denoise":
            assert model.pick(t) == EXPERT_INDEX[c["expert"]], f"call {i}: t={t} dispatched to the wrong expert"
            out = s.denoise(x, t, c["start_frame"])
            plan_sigma = sched.rest.sigma_x0[c["step"]]
            sigma = plan_sigma - bound.sigma_x0 if c["conversion"] == "x_bound" else plan_sigma
            assert (c["conversion"] == "x_bound") == bound.is_high(t)
            pred = (x.double() - sigma * out.double()).float()
            _close(pred, rec[f"call.{i}.pred"], tol, f"call {i} pred")
        else:
            out = s.denoiser(x, torch.full(x.shape[:2], t), c["start_frame"])   # the commit, output kept
        _close(out.transpose(1, 2), rec[f"call.{i}.output"], tol, f"call {i} ({c['kind']}, {c['expert']}) output")


def _rollout(cross_attention="shared_high"):
    cj, inp, rec = inputs_and_record()
    stream = open_stream(experts(cross_attention), cj, inp["latents"])
    stream.set_conditions(text=inp["prompt_embeds"])
    draws = [rec[f"draw.{k}"] for k in range(sum(1 for n in rec if n.startswith("draw.")))]
    traces = []
    roll = ARRollout(stream, schedule(cj), fv(cj)["num_frames_per_block"], inp["latents"].transpose(1, 2),
                     draws=draws, first_block_frames=cj["block_sizes"][0], trace=traces.append)
    out = roll.run_all().transpose(1, 2)
    return cj, rec, roll, traces, out, len(draws)


def test_end_to_end():
    cj, rec, roll, traces, out, n_draws = _rollout()
    tol = cj["tolerance"]
    assert [roll.block_frames(b) for b in range(roll.num_blocks)] == cj["block_sizes"]
    assert roll.num_draws == n_draws
    _close(out, rec["final_latents"], tol, "final_latents")
    by_step = {(c["block"], c["step"]): c["index"] for c in cj["calls"] if c["kind"] == "denoise"}
    denoise = [tr for tr in traces if tr.kind == "denoise"]
    assert len(denoise) == len(by_step)
    for tr in denoise:
        i = by_step[(tr.block, tr.step)]
        assert tr.frame_start == cj["calls"][i]["start_frame"]
        _close(tr.x.transpose(1, 2), rec[f"call.{i}.input"], tol, f"call {i} input (re-noised)")
        _close(tr.x0, rec[f"call.{i}.pred"], tol, f"call {i} pred")


def test_per_expert_text_cache_is_not_upstream():
    """FlashDreams' per-expert cross-attention caches give another video: the shared cache is what the golden pins."""
    cj, rec, _, _, out, _ = _rollout("per_expert")
    assert not torch.allclose(out, rec["final_latents"], atol=cj["tolerance"]["atol"] * 100)
