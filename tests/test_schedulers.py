"""Parity of the flow samplers with the `schedulers` golden case (FlowMatch table, warp,
add_noise / flow_to_x0 lookups, Wan's UniPC open and closed loop, CFG)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import yaml

import engine
from engine import Node, Param, Port, Registry
from engine.types import DENOISER, TEXT_EMBEDDING

from goldens import case_json, has_case, tensors
from nodes.samplers import FlowEuler, FlowMatchTable, FlowUniPC, cfg_combine, shifted_flow_schedule

CASE = "schedulers"


@pytest.fixture(scope="module")
def case():
    cj = case_json(CASE)
    return cj, tensors(CASE, cj["files"]["tensors"])


def _fm_keys():
    # case absent: one placeholder key, whose test skips (or, FD_GOLDENS set, fails) through case_dir
    return sorted(case_json(CASE)["meta"]["flowmatch"]) if has_case(CASE) else ["absent"]


def _unipc_keys():
    return sorted(case_json(CASE)["meta"]["unipc"]) if has_case(CASE) else ["absent"]


def _table_tolerance(cj):
    tol = cj.get("tolerance", {}).get("flowmatch_tables", {})
    return dict(atol=tol.get("atol", 0.0), rtol=tol.get("rtol", 0.0))


@pytest.mark.parametrize("key", _fm_keys())
def test_flowmatch_tables(case, key):
    cj, ts = case
    table = FlowMatchTable(cj["meta"]["flowmatch"][key]["shift"])
    tol = _table_tolerance(cj)
    torch.testing.assert_close(table.sigmas, ts[f"{key}.sigmas"], **tol)
    torch.testing.assert_close(table.timesteps, ts[f"{key}.timesteps"], **tol)
    # The training-loss weights go through exp(), whose float32 rounding differs by 1 ulp
    # between builds/CPUs (seen on 25/1000 entries vs the golden); that ulp of exp(.)~0.6,
    # times the ~5x normalisation, is ~3e-7 absolute. Only training reads these weights.
    torch.testing.assert_close(table.linear_timesteps_weights, ts[f"{key}.linear_timesteps_weights"],
                               atol=max(tol["atol"], 1e-6), rtol=max(tol["rtol"], 1e-6))


@pytest.mark.parametrize("key", _fm_keys())
def test_warp(case, key):
    cj, ts = case
    meta = cj["meta"]["flowmatch"][key]
    table = FlowMatchTable(meta["shift"])
    assert meta["warped"], "no warped lists recorded"
    for name, values in meta["warped"].items():
        steps = [int(s) for s in name.split("_")]
        got = table.warp(steps)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ts[f"{key}.warped.{name}"], atol=0.0, rtol=0.0)
        assert got.tolist() == values


def _table_for(cj, t: torch.Tensor) -> FlowMatchTable:
    """The recorded lookups name no shift: use the table whose entries contain every timestep."""
    for key in sorted(cj["meta"]["flowmatch"]):
        table = FlowMatchTable(cj["meta"]["flowmatch"][key]["shift"])
        if all(bool((table.timesteps == v).any()) or v == 0 for v in t.tolist()):
            return table
    raise AssertionError(f"no FlowMatch table in the case holds timesteps {t.tolist()}")


def test_add_noise(case):
    cj, ts = case
    t = ts["fm_add_noise.timestep"]
    table = _table_for(cj, t)
    out = table.add_noise(ts["fm_add_noise.x0"], ts["fm_add_noise.noise"], t)
    torch.testing.assert_close(out, ts["fm_add_noise.out"], atol=0.0, rtol=0.0)
    # per-frame [B, f] timesteps address the leading two dims of [B, f, C, H, W]
    x0, noise = ts["fm_add_noise.x0"][None], ts["fm_add_noise.noise"][None]
    torch.testing.assert_close(table.add_noise(x0, noise, t[None]), ts["fm_add_noise.out"][None], atol=0.0, rtol=0.0)


def test_flow_to_x0(case):
    cj, ts = case
    t = ts["fm_flow_to_x0.timestep"]
    table = _table_for(cj, t)
    out = table.flow_to_x0(ts["fm_flow_to_x0.xt"], ts["fm_flow_to_x0.flow"], t)
    torch.testing.assert_close(out, ts["fm_flow_to_x0.out"], atol=0.0, rtol=0.0)
    # the host-side scalar sigmas used by precomputed plans agree with the tensor lookup
    for i, v in enumerate(t.tolist()):
        s_noise, s_x0 = table.scalar_sigmas(v)
        xt, flow = ts["fm_flow_to_x0.xt"][i], ts["fm_flow_to_x0.flow"][i]
        torch.testing.assert_close((xt.double() - s_x0 * flow.double()).float(), ts["fm_flow_to_x0.out"][i],
                                   atol=0.0, rtol=0.0)
        assert s_noise == float(table.sigma_at(torch.tensor([v]))[0])


def _fake_model(cj):
    """cond/uncond/CFG of the case's fake model, evaluated from the formulas it records."""
    fm = cj.get("fake_model", {})
    cond_src = fm.get("cond", "sin(latent + i)")
    uncond_src = fm.get("uncond", "0.5 * cos(0.7 * latent - i)")
    scale = float(fm.get("guide_scale", 5.0))
    env = {"sin": torch.sin, "cos": torch.cos, "exp": torch.exp, "tanh": torch.tanh, "pi": math.pi}

    def run(src, latent, i):
        return eval(src, {"__builtins__": {}}, {**env, "latent": latent, "i": i})  # noqa: S307 (case file)

    return (lambda lat, i: run(cond_src, lat, i)), (lambda lat, i: run(uncond_src, lat, i)), scale


def _unipc_setup(cj, ts, key):
    meta = cj["meta"]["unipc"][key]
    sched = FlowUniPC(num_train_timesteps=1000, shift=1)
    sched.set_timesteps(meta["steps"], shift=meta["shift"])
    tol = cj["tolerance"]["unipc_latents"][key]
    return meta, sched, dict(atol=tol["atol"], rtol=tol["rtol"])


@pytest.mark.parametrize("key", _unipc_keys())
def test_unipc_schedule(case, key):
    cj, ts = case
    meta, sched, _ = _unipc_setup(cj, ts, key)
    assert sched.timesteps.dtype == torch.int64
    assert torch.equal(sched.timesteps, ts[f"{key}.timesteps"])
    assert sched.timesteps.tolist() == meta["timesteps"]
    assert sched.sigmas.shape == (meta["steps"] + 1,) and float(sched.sigmas[-1]) == 0.0
    torch.testing.assert_close(sched.sigmas, ts[f"{key}.sigmas"], atol=0.0, rtol=0.0)


@pytest.mark.parametrize("key", _unipc_keys())
def test_unipc_open_loop(case, key):
    """Recorded noise_pred fed to our solver state; every step's latent compared."""
    cj, ts = case
    meta, sched, tol = _unipc_setup(cj, ts, key)
    latent = ts["unipc.latent0"].clone()
    for i, t in enumerate(sched.timesteps):
        latent = sched.step(ts[f"{key}.step.{i}.noise_pred"][None], t, latent[None])[0]
        torch.testing.assert_close(latent, ts[f"{key}.step.{i}.latent_after"], **tol)


@pytest.mark.parametrize("key", _unipc_keys())
def test_unipc_closed_loop_with_cfg(case, key):
    """The fake model is re-evaluated on our own latents, guided with our CFG."""
    cj, ts = case
    meta, sched, tol = _unipc_setup(cj, ts, key)
    cond_fn, uncond_fn, scale = _fake_model(cj)
    latent = ts["unipc.latent0"].clone()
    for i, t in enumerate(sched.timesteps):
        cond, uncond = cond_fn(latent, i), uncond_fn(latent, i)
        noise_pred = cfg_combine(cond, uncond, scale)
        torch.testing.assert_close(cond, ts[f"{key}.step.{i}.cond"], **tol)
        torch.testing.assert_close(uncond, ts[f"{key}.step.{i}.uncond"], **tol)
        # guidance extrapolates: latent errors reach noise_pred amplified by up to 1 + 2|scale|
        amp = 1 + 2 * abs(scale)
        torch.testing.assert_close(noise_pred, ts[f"{key}.step.{i}.noise_pred"],
                                   atol=tol["atol"] * amp, rtol=tol["rtol"] * amp)
        latent = sched.step(noise_pred[None], t, latent[None])[0]
        torch.testing.assert_close(latent, ts[f"{key}.step.{i}.latent_after"], **tol)


def test_cfg_matches_recorded_combination(case):
    cj, ts = case
    _, _, scale = _fake_model(cj)
    for key in _unipc_keys():
        for i in range(cj["meta"]["unipc"][key]["steps"]):
            got = cfg_combine(ts[f"{key}.step.{i}.cond"], ts[f"{key}.step.{i}.uncond"], scale)
            torch.testing.assert_close(got, ts[f"{key}.step.{i}.noise_pred"], atol=0.0, rtol=0.0)


@pytest.mark.parametrize("key", _unipc_keys())
def test_euler_on_straight_path_lands_on_x0(case, key):
    """Same schedule API as UniPC; with the exact velocity of a straight path Euler is exact."""
    cj, ts = case
    meta = cj["meta"]["unipc"][key]
    sched = FlowEuler(shift=1)
    sched.set_timesteps(meta["steps"], shift=meta["shift"])
    assert torch.equal(sched.timesteps, ts[f"{key}.timesteps"])
    torch.testing.assert_close(sched.sigmas, ts[f"{key}.sigmas"], atol=0.0, rtol=0.0)
    g = torch.Generator().manual_seed(0)
    x0 = ts["unipc.latent0"]
    noise = torch.randn(x0.shape, generator=g)
    x = (1 - sched.sigmas[0]) * x0 + sched.sigmas[0] * noise
    for t in sched.timesteps:
        x = sched.step(noise - x0, t, x)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=1e-5)


def test_shifted_schedule_is_monotone_and_ends_at_zero():
    timesteps, sigmas = shifted_flow_schedule(7, 3.0)
    assert timesteps.shape == (7,) and sigmas.shape == (8,)
    assert bool((sigmas[1:] < sigmas[:-1]).all()) and float(sigmas[-1]) == 0.0


class _FakeWan(Node):
    """A wan.dit stand-in whose DiT is the case's fake model: cond for the prompt, uncond for the
    negative prompt, step index i from the timestep (wan.t2v_sampler reaches the DiT only through
    ``module(x, t, None, y=, cross=)`` and ``module.prepare_cross``)."""
    type_name = "test.fake_wan"
    outputs = (Port("model", DENOISER, "the fake DiT"), Port("text", TEXT_EMBEDDING, "prompt"),
               Port("negative", TEXT_EMBEDDING, "negative prompt"))
    params = (Param("key", str, "", "the unipc case key"),)
    phase = "session"
    fns: tuple = ()

    def run(self, inputs, state, step):
        cond_fn, uncond_fn, timesteps = self.fns

        class Module:
            patch_embedding = SimpleNamespace(weight=torch.zeros(1))

            def prepare_cross(self, text, clip=None):
                return "cond" if float(text.sum()) > 0 else "uncond"

            def __call__(self, x, t, context, y=None, cross=None):
                i = timesteps.index(int(t))
                return (cond_fn if cross == "cond" else uncond_fn)(x[0], i)[None]

        handle = SimpleNamespace(module=Module(), config=SimpleNamespace(model_type="t2v"))
        return {"model": handle, "text": torch.ones(1, 2, 4), "negative": torch.zeros(1, 2, 4)}


class _Replay:
    """``torch`` in nodes.wan.node_t2v, with the one noise draw replaced by the recorded latent0."""

    def __init__(self, latent0):
        self.latent0, self.calls = latent0, 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn(self, shape, **kw):
        assert tuple(shape) == tuple(self.latent0.shape)
        self.calls += 1
        return self.latent0.clone()


def _run_t2v_node(cj, ts, key, tmp_path, monkeypatch, **params) -> torch.Tensor:
    """The latent of wan.t2v_sampler (spec -> plan -> session) on the case's fake model and latent0."""
    meta = cj["meta"]["unipc"][key]
    cond_fn, uncond_fn, _ = _fake_model(cj)
    latent0 = ts["unipc.latent0"]
    c, f, h, w = latent0.shape
    monkeypatch.setattr(_FakeWan, "fns", (cond_fn, uncond_fn, meta["timesteps"]))
    rng = _Replay(latent0)
    monkeypatch.setattr("nodes.wan.node_t2v.torch", rng)
    params = {"num_steps": meta["steps"], "shift": meta["shift"], "frames": 1 + 4 * (f - 1), "latent_channels": c,
              "latent_height": h, "latent_width": w, **params}
    spec = {"name": "t2v_golden", "inputs": {"prompt": "unused"},
            "nodes": {"fake": {"type": "test.fake_wan", "params": {"key": key}, "device": "cpu"},
                      "sampler": {"type": "wan.t2v_sampler", "device": "cpu", "params": params,
                                  "in": {"model": "fake.model", "text": "fake.text", "negative": "fake.negative"}}},
            "sinks": {"out": {"type": "sink.safetensors", "in": {"tensor": "sampler.latent"},
                              "params": {"path": str(tmp_path / "out.safetensors")}}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    reg = Registry.default()
    reg.add(_FakeWan)
    pipe = engine.load(path, registry=reg)
    with pipe.load().open_session() as s:
        got = s.step().outputs["sampler"]["latent"]
    assert rng.calls == 1
    return got


@pytest.mark.parametrize("key", _unipc_keys())
def test_t2v_sampler_node_matches_the_golden(case, key, tmp_path, monkeypatch):
    """wan.t2v_sampler with solver, steps, shift, guidance scale and latent size from the case: its
    latent is the recorded one after the last step."""
    cj, ts = case
    meta = cj["meta"]["unipc"][key]
    got = _run_t2v_node(cj, ts, key, tmp_path, monkeypatch, solver="unipc", guide_scale=_fake_model(cj)[2])
    tol = cj["tolerance"]["unipc_latents"][key]
    want = ts[f"{key}.step.{meta['steps'] - 1}.latent_after"]
    torch.testing.assert_close(got, want.transpose(0, 1)[None], atol=tol["atol"], rtol=tol["rtol"])


@pytest.mark.parametrize("solver,scale", [("unipc", 2.0), ("euler", 5.0)])
def test_t2v_sampler_node_solver_and_scale_params(case, solver, scale, tmp_path, monkeypatch):
    """The params the golden holds at one value (guidance 5, UniPC): another scale and the Euler solver
    reach the numbers. Reference: the golden-checked solver and CFG, looped here on the fake model."""
    cj, ts = case
    key = _unipc_keys()[0]
    meta = cj["meta"]["unipc"][key]
    got = _run_t2v_node(cj, ts, key, tmp_path, monkeypatch, solver=solver, guide_scale=scale)
    cond_fn, uncond_fn, _ = _fake_model(cj)
    sched = FlowUniPC() if solver == "unipc" else FlowEuler()
    sched.set_timesteps(meta["steps"], shift=meta["shift"])
    latent = ts["unipc.latent0"].clone()
    for i, t in enumerate(sched.timesteps):
        flow = cfg_combine(cond_fn(latent, i), uncond_fn(latent, i), scale)
        latent = sched.step(flow[None], t, latent[None])[0]
    torch.testing.assert_close(got, latent.transpose(0, 1)[None], atol=1e-5, rtol=1e-5)
