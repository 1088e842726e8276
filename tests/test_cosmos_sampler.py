"""Cosmos' RectifiedFlowAB2 sampler vs the upstream goldens (`cosmos_sampler`), through FD_GOLDENS.

The case's fake x0 model (a closed formula, written in case.json) stands in for the network; every size and
schedule value (steps, sigma range, rho, seed, shape) comes from the case.
"""
from __future__ import annotations

import re

import torch
from goldens import case_json, tensors

from nodes.cosmos.scheduler import RectifiedFlowAB2, device_invariant_noise, karras_sigmas, rf_scaling
from nodes.cosmos.video2world import Video2World

CASE = "cosmos_sampler"


FUNCS = {"tanh": torch.tanh, "sin": torch.sin, "cos": torch.cos, "exp": torch.exp}


def fake_model(text: str):
    """The case's fake x0 model from its formula, e.g. 'x0 = tanh(0.35*x)/(1+0.1*sigma) + ... (notes)':
    only x, sigma, numbers, + - * / ( ) and tanh/sin/cos/exp are allowed."""
    expr = text.split("=", 1)[1].split(" (", 1)[0].strip()
    names = set(re.findall(r"[A-Za-z_]\w*", expr))
    bad = names - set(FUNCS) - {"x", "sigma"}
    assert not bad and re.fullmatch(r"[\w\s.+\-*/()]+", expr), f"unexpected fake model {expr!r}"
    code = compile(expr, "<fake_x0_model>", "eval")

    def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return eval(code, {"__builtins__": {}}, {**FUNCS, "x": x, "sigma": sigma.to(torch.float32)})
    return fn


def _case():
    cj = case_json(CASE)
    return cj, cj["config"], tensors(CASE, cj["files"]["outputs"])


def test_schedule_noise_and_scaling_are_exact():
    cj, c, ref = _case()
    sigmas = karras_sigmas(c["steps"], c["sigma_min"], c["sigma_max"], c["order"])
    assert sigmas.dtype == ref["sigmas"].dtype and torch.equal(sigmas, ref["sigmas"])
    sched = RectifiedFlowAB2(c["sigma_min"], c["sigma_max"], c["order"])
    assert torch.equal(sched.set_timesteps(c["steps"]), ref["timesteps"])
    noise = device_invariant_noise(c["shape"], c["seed"])
    assert torch.equal(noise, ref["noise"])
    assert torch.equal(noise * c["sigma_max"], ref["x_sigma_max"])
    for name, value in zip(("c_skip", "c_out", "c_in", "c_noise"), rf_scaling(ref["sigmas"])):
        assert torch.equal(value, ref[f"scaling.{name}"]), name


def test_fake_model_is_read_from_the_case():
    fn = fake_model("x0 = tanh(0.35*x)/(1+0.1*sigma) + 0.2*sin(0.5*x + 0.01*sigma) (float32 tensors)")
    x, s = torch.linspace(-2, 2, 5), torch.tensor(3.0)
    ref = torch.tanh(0.35 * x) / (1 + 0.1 * s) + 0.2 * torch.sin(0.5 * x + 0.01 * s)
    assert torch.equal(fn(x, s), ref)


def test_open_loop_steps_match_upstream():
    """Each step from the recorded previous sample and the recorded x0: the solver alone."""
    cj, c, ref = _case()
    tol = cj["tolerance"]["samples"]
    sched = RectifiedFlowAB2(c["sigma_min"], c["sigma_max"], c["order"])
    sched.set_timesteps(c["steps"])
    sample = ref["x_sigma_max"]
    for i in range(c["steps"]):
        sample_next = sched.step(ref[f"step.{i}.x0_pred"], i, sample)
        torch.testing.assert_close(sample_next, ref[f"step.{i}.sample_after"], atol=tol["atol"], rtol=tol["rtol"],
                                   msg=lambda m: f"step {i}: {m}")
        sample = ref[f"step.{i}.sample_after"]


def test_closed_loop_rollout_matches_upstream():
    """The whole loop of Video2World.sample with the fake model: every x0, every sample, the final x0."""
    cj, c, ref = _case()
    tol = cj["tolerance"]["samples"]
    seen = []
    out = Video2World(model=None).sample(fake_model(cj["fake_x0_model"]), c["shape"], c["seed"], num_steps=c["steps"],
                                         sigma_min=c["sigma_min"], sigma_max=c["sigma_max"], rho=c["order"],
                                         on_step=lambda i, x0, s: seen.append((x0, s)))
    assert len(seen) == c["steps"]
    for i, (x0, s) in enumerate(seen):
        torch.testing.assert_close(x0, ref[f"step.{i}.x0_pred"], atol=tol["atol"], rtol=tol["rtol"])
        torch.testing.assert_close(s, ref[f"step.{i}.sample_after"], atol=tol["atol"], rtol=tol["rtol"])
    torch.testing.assert_close(out, ref["final_x0"], atol=tol["atol"], rtol=tol["rtol"])
