"""Open-loop parity of the AR block sampler with the Self-Forcing / Causal-Forcing goldens.

A fake denoiser replays the recorded model outputs (``call.i.flow_pred``) and checks that
the rollout asks for exactly the recorded calls: input latents, timesteps, frame offsets.
Recorded re-noise draws (``draw.k``) replace the RNG. Everything - variants, step lists,
first-chunk lists, frames per block, shift, block counts, tolerances - comes from case.json.
"""
from __future__ import annotations

import pytest
import torch

from goldens import case_json, case_value, tensors, variant_params
from nodes.ar import ARRollout, ARSchedule
from nodes.samplers import FlowMatchTable

CASES = ("causal_selfforcing", "causal_forcing_framewise", "causal_forcing_i2v")


def _setup(case: str, vname: str | None):
    cj = case_json(case)
    if vname is None:
        pytest.skip(f"{case} has no variants")
    v = cj["variants"][vname]
    inputs = tensors(case, cj["files"]["inputs"])
    record = tensors(case, v["record_file"])
    return cj, v, inputs, record


def _schedule(cj, v) -> ARSchedule:
    table = FlowMatchTable(case_value(cj, v, "timestep_shift"))
    return ARSchedule.build(table, case_value(cj, v, "denoising_step_list"),
                            first_chunk_steps=case_value(cj, v, "denoising_step_list_first_chunk"),
                            warp=case_value(cj, v, "warp_denoising_step", True),
                            context_noise=case_value(cj, v, "context_noise", 0))


def _frame_tokens(cj, noise: torch.Tensor) -> int:
    _, ph, pw = cj.get("model_kwargs", {}).get("patch_size", [1, 2, 2])
    tokens = (noise.shape[-2] // ph) * (noise.shape[-1] // pw)
    recorded = cj.get("frame_tokens", cj.get("shapes", {}).get("frame_tokens"))
    assert recorded is None or recorded == tokens
    return tokens


def _tol(v, name):
    t = v["tolerance"][name]
    return dict(atol=t["atol"], rtol=t["rtol"])


class ReplayDenoiser:
    """Returns call i's recorded flow after checking the call matches the record."""

    def __init__(self, cj, v, record, frame_tokens):
        self.v, self.record, self.frame_tokens = v, record, frame_tokens
        self.calls = v["calls"]
        self.input_tol = _tol(v, "per_call_x0_pred")  # re-noised inputs are made from x0
        self.i = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, frame_start: int) -> torch.Tensor:
        i, rec = self.i, self.record
        assert i < len(self.calls), f"more denoiser calls than the {len(self.calls)} recorded"
        torch.testing.assert_close(x, rec[f"call.{i}.input"], **self.input_tol, msg=lambda m: f"call {i} input: {m}")
        assert t.dtype == torch.float32 and t.shape == rec[f"call.{i}.timestep"].shape
        assert torch.equal(t, rec[f"call.{i}.timestep"].to(torch.float32)), (i, t, rec[f"call.{i}.timestep"])
        assert float(t.flatten()[0]) == self.calls[i]["timestep_value"]
        current_start = int(rec[f"call.{i}.current_start"])
        assert current_start == self.calls[i]["current_start"]
        assert frame_start == current_start // self.frame_tokens, (i, frame_start, current_start)
        assert frame_start == self.calls[i].get("current_start_frame", frame_start)
        self.i += 1
        return rec[f"call.{i}.flow_pred"]


def _rollout(cj, v, inputs, record, trace=None):
    noise = inputs["noise"]
    draws = [record[f"draw.{k}"] for k in range(v["num_draws"])]
    den = ReplayDenoiser(cj, v, record, _frame_tokens(cj, noise))
    roll = ARRollout(den, _schedule(cj, v), case_value(cj, v, "num_frame_per_block"), noise,
                     initial_latent=inputs.get("initial_latent"), draws=draws, trace=trace)
    return roll, den


@pytest.mark.parametrize("case,vname", variant_params(CASES))
def test_schedule_matches_record(case, vname):
    cj, v, inputs, record = _setup(case, vname)
    sched = _schedule(cj, v)
    assert list(sched.rest.t) == v["warped_timesteps"]
    first = v.get("warped_timesteps_first_chunk")
    assert list(sched.first.t) == (first if first is not None else v["warped_timesteps"])
    assert sched.context_t == case_value(cj, v, "context_noise", 0)
    nfpb = case_value(cj, v, "num_frame_per_block")
    assert inputs["noise"].shape[1] % nfpb == 0
    assert len([k for k in record if k.startswith("draw.")]) == v["num_draws"]


@pytest.mark.parametrize("case,vname", variant_params(CASES))
def test_rollout_replays_recorded_calls(case, vname):
    cj, v, inputs, record = _setup(case, vname)
    traces = []
    roll, den = _rollout(cj, v, inputs, record, trace=traces.append)
    out = roll.run_all()

    assert roll.num_calls == den.i == v["num_calls"] == len(v["calls"])
    assert roll.num_draws == v["num_draws"]
    nfpb = case_value(cj, v, "num_frame_per_block")
    assert roll.num_blocks == inputs["noise"].shape[1] // nfpb
    x0_tol = _tol(v, "per_call_x0_pred")
    for tr, meta in zip(traces, v["calls"]):
        assert tr.kind == meta["kind"], (tr.index, tr.kind, meta)
        if meta["kind"] != "image":
            assert (tr.block, tr.step) == (meta["block"], meta["step"]), (tr.index, meta)
        if tr.kind == "denoise":
            torch.testing.assert_close(tr.x0, record[f"call.{tr.index}.x0_pred"], **x0_tol,
                                       msg=lambda m: f"call {tr.index} x0: {m}")
    torch.testing.assert_close(out, record["final_latents"], **_tol(v, "final_latents"))
    if "initial_latent" in inputs:
        torch.testing.assert_close(out[:, :inputs["initial_latent"].shape[1]], inputs["initial_latent"],
                                   atol=0.0, rtol=0.0)


@pytest.mark.parametrize("case,vname", variant_params(CASES))
def test_streaming_steps_match_final_latents(case, vname):
    """One ``step()`` per block yields the same frames as the recorded full rollout."""
    cj, v, inputs, record = _setup(case, vname)
    roll, den = _rollout(cj, v, inputs, record)
    nfpb = case_value(cj, v, "num_frame_per_block")
    start = roll.first_frame
    for b in range(roll.num_blocks):
        block = roll.step()
        assert block.shape[1] == nfpb
        torch.testing.assert_close(block, record["final_latents"][:, start + b * nfpb:start + (b + 1) * nfpb],
                                   **_tol(v, "final_latents"))
    assert den.i == v["num_calls"]
    with pytest.raises(IndexError):
        roll.step()


def _synthetic_schedule(context_noise=0.0):
    return ARSchedule.build(FlowMatchTable(5.0), [1000, 750, 500], context_noise=context_noise)


def test_default_draws_follow_seeded_generator_in_call_order():
    """Without injected draws, re-noise draws are randn([B*f, C, H, W]) from a generator seeded with ``seed``."""
    seen = []

    def identity_x0(x, t, frame_start):  # flow 0 -> x0 = x
        seen.append((x.clone(), float(t[0, 0]), frame_start))
        return torch.zeros_like(x)

    B, F, nfpb, C, H, W = 2, 4, 2, 3, 2, 4
    noise = torch.randn(B, F, C, H, W, generator=torch.Generator().manual_seed(1))
    sched = _synthetic_schedule()
    out = ARRollout(identity_x0, sched, nfpb, noise, seed=123).run_all()

    g = torch.Generator().manual_seed(123)
    x = noise[:, :nfpb]
    for i in range(1, len(sched.rest)):
        draw = torch.randn(B * nfpb, C, H, W, generator=g).reshape(B, nfpb, C, H, W)
        x = (1 - sched.rest.sigma_noise[i]) * x + sched.rest.sigma_noise[i] * draw
        torch.testing.assert_close(seen[i][0], x, atol=0.0, rtol=0.0)
    per_block = len(sched.rest) + 1
    assert [s[2] for s in seen] == [b * nfpb for b in range(F // nfpb) for _ in range(per_block)]
    assert out.shape == noise.shape
    torch.testing.assert_close(out[:, :nfpb], x, atol=0.0, rtol=0.0)


def test_context_noise_renoises_the_context_pass():
    seen = []

    def identity_x0(x, t, frame_start):
        seen.append((x.clone(), t.clone()))
        return torch.zeros_like(x)

    noise = torch.randn(1, 2, 2, 2, 2, generator=torch.Generator().manual_seed(2))
    sched = _synthetic_schedule(context_noise=100.0)
    draws = [torch.full((1, 2, 2, 2), float(k + 1)) for k in range(2 * len(sched.rest))]
    roll = ARRollout(identity_x0, sched, 1, noise, draws=draws)
    first = roll.step()
    ctx_x, ctx_t = seen[len(sched.rest)]
    assert torch.equal(ctx_t, torch.full((1, 1), 100.0))
    s = sched.context_sigma_noise
    assert 0.0 < s < 1.0
    torch.testing.assert_close(ctx_x, (1 - s) * first + s * draws[len(sched.rest) - 1][None], atol=0.0, rtol=0.0)
    assert roll.num_draws == len(sched.rest)  # (steps - 1) re-noises + 1 context re-noise
