"""Predict2.5 sampling: Cosmos' Karras flow schedule and the shared FlowUniPC against diffusers' UniPC, and the
Video2World velocity loop against a plain re-derivation of upstream's ``Video2WorldModelRectifiedFlow``.

No golden covers Predict2.5's sampler, so the references are independent: the Karras formula written out in
python floats here; diffusers' ``UniPCMultistepScheduler`` (flow prediction, bh2, order 2, custom flow
sigmas) for the solver; and the denoise / guidance / frame-replacement steps re-derived in this file from
upstream's code (FRAME_REPLACE, ``conditional_frame_timestep``, ``noise - x0`` velocity on the clean frames,
``cond + g (cond - uncond)``), driven by diffusers' scheduler.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nodes.cosmos.config import CosmosConfig
from nodes.cosmos.flow_video2world import FlowVideo2World, flow_schedule
from nodes.cosmos.model import CosmosDiT
from nodes.cosmos.scheduler import device_invariant_noise
from nodes.samplers.unipc import FlowUniPC, karras_flow_schedule, shifted_flow_schedule

diffusers = pytest.importorskip("diffusers")
torch.backends.cuda.matmul.allow_tf32 = False


def _karras_by_hand(n: int, smin: float, smax: float, rho: float) -> list[float]:
    out = []
    for i in range(n + 1):
        edm = (smax ** (1 / rho) + i / n * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        out.append(edm / (1 + edm))
    return out


def _diffusers_unipc(flow_sigmas: list[float]):
    sched = diffusers.UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=2,
                                              prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                                              predict_x0=True, solver_type="bh2", lower_order_final=True,
                                              final_sigmas_type="zero")
    sched.set_timesteps(sigmas=np.array(flow_sigmas, dtype=np.float64))
    return sched


@pytest.mark.parametrize("n,smin,smax,rho", [(35, 0.01, 200.0, 7.0), (7, 0.05, 80.0, 5.0), (1, 0.01, 200.0, 7.0)])
def test_karras_flow_schedule_is_edm_sigmas_on_the_flow_path(n, smin, smax, rho):
    timesteps, sigmas = karras_flow_schedule(n, smin, smax, rho)
    want = _karras_by_hand(n, smin, smax, rho)
    assert len(timesteps) == n + 1 and len(sigmas) == n + 2 and float(sigmas[-1]) == 0.0  # N + 1 model calls
    torch.testing.assert_close(sigmas[:-1].double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    assert timesteps.tolist() == [int(s * 1000) for s in want]
    ref = _diffusers_unipc(want)              # diffusers builds the same table from the same sigmas
    assert torch.equal(ref.timesteps, timesteps) and torch.equal(ref.sigmas, sigmas)


def test_shift_schedule_is_wans():
    ts, sg = flow_schedule("shift", 10, shift=5.0)
    ts2, sg2 = shifted_flow_schedule(10, 5.0)
    assert torch.equal(ts, ts2) and torch.equal(sg, sg2)
    with pytest.raises(ValueError, match="karras or shift"):
        flow_schedule("linear", 10)


@pytest.mark.parametrize("n", [35, 4])
def test_flow_unipc_on_the_karras_schedule_matches_diffusers(n):
    """Closed loop from the same start; a deterministic nonlinear 'velocity' of the current sample."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 3, 5, 6, generator=g)
    timesteps, sigmas = karras_flow_schedule(n)
    ours = FlowUniPC()
    ours.set_schedule(timesteps, sigmas)
    ref = _diffusers_unipc(_karras_by_hand(n, 0.01, 200.0, 7.0))
    a = b = x0
    for i, t in enumerate(timesteps):
        a = ours.step(torch.sin(a + i) * 0.7 - 0.3 * a, t, a)
        b = ref.step(torch.sin(b + i) * 0.7 - 0.3 * b, ref.timesteps[i], b).prev_sample
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert ours.step_index == len(timesteps)


# ---------------------------------------------------------------------- the Video2World loop
def _tiny_predict25(seed=0) -> CosmosDiT:
    cfg = CosmosConfig(in_channels=4, out_channels=4, model_channels=24, num_blocks=2, num_heads=2,
                       crossattn_emb_channels=8, crossattn_proj_in_channels=12, adaln_lora_dim=4,
                       timestep_scale=0.001)
    torch.manual_seed(seed)
    model = CosmosDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.1) + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def _reference_rollout(model, text, negative, gt, n_cond, guidance, cft, n, seed, shape):
    """Upstream's generate_samples_from_batch + Video2WorldModelRectifiedFlow.denoise, written out."""
    noise = device_invariant_noise(shape, seed)
    sched = _diffusers_unipc(_karras_by_hand(n, 0.01, 200.0, 7.0))
    B, C, T, H, W = shape
    mask = torch.zeros(B, 1, T, H, W)
    mask[:, :, :n_cond] = 1
    mC = mask.repeat(1, C, 1, 1, 1)

    def denoise(x, t, emb):
        x_in = gt * mC + x * (1 - mC)
        m_t = mC.mean(dim=[1, 3, 4], keepdim=True)                          # [B, 1, T, 1, 1]
        tt = torch.full((B, 1), float(t))
        if cft >= 0:
            tt = (torch.ones_like(m_t) * cft * m_t + tt[:, :, None, None, None] * (1 - m_t)).reshape(B, T)
        else:
            tt = tt.expand(B, T)
        out = model(x_in, tt, emb, condition_mask=mask).float()
        return (noise - gt) * mC + out * (1 - mC)

    x = noise
    for t in sched.timesteps:
        vc, vu = denoise(x, t, text), denoise(x, t, negative)
        x = sched.step(vc + guidance * (vc - vu), t, x).prev_sample
    return x


@pytest.mark.parametrize("n_cond,cft,batched", [(1, 0.1, False), (1, 0.1, True), (0, 0.1, True), (2, -1.0, False)])
def test_velocity_rollout_matches_the_re_derivation(n_cond, cft, batched):
    model = _tiny_predict25()
    g = torch.Generator().manual_seed(1)
    shape = (1, 4, 4, 4, 6)
    text, negative = torch.randn(1, 5, 12, generator=g), torch.randn(1, 5, 12, generator=g)
    gt = torch.zeros(shape)
    gt[:, :, :n_cond] = torch.randn(1, 4, n_cond, 4, 6, generator=g)
    n, guidance, seed = 5, 3.0, 7
    fv = FlowVideo2World(model, conditional_frame_timestep=cft)
    with torch.no_grad():
        fn = fv.velocity_fn(model.prepare_cross(text), model.prepare_cross(negative), guidance,
                            gt=gt if n_cond else None, num_conditional_frames=n_cond, batched=batched)
        ours = fv.sample(fn, shape, seed, flow_schedule("karras", n))
        ref = _reference_rollout(model, text, negative, gt, n_cond, guidance, cft, n, seed, shape)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    if n_cond:
        # the clean frames end NEAR their latents, not on them (upstream too): the rollout starts at the noise,
        # not at (1 - s0) gt + s0 noise (s0 = 0.995), and the multistep terms carry that start along
        torch.testing.assert_close(ours[:, :, :n_cond], gt[:, :, :n_cond], rtol=0, atol=0.05)
        assert not torch.allclose(ours[:, :, n_cond:], gt[:, :, n_cond:], atol=1e-2)


def test_the_clean_frame_timestep_is_pinned_and_the_rest_follow_the_schedule():
    model = _tiny_predict25()
    seen = []
    orig = model.embed_time
    model.embed_time = lambda t: (seen.append(t.clone()), orig(t))[1]
    gt = torch.randn(1, 4, 3, 4, 6)
    fv = FlowVideo2World(model, conditional_frame_timestep=0.1)
    with torch.no_grad():
        fn = fv.velocity_fn(model.prepare_cross(torch.randn(1, 5, 12)), num_conditional_frames=1, gt=gt)
        timesteps, sigmas = flow_schedule("karras", 3)
        fv.sample(fn, gt.shape, 0, (timesteps, sigmas))
    assert len(seen) == len(timesteps) == 4
    for t_B_T, t in zip(seen, timesteps):
        assert torch.allclose(t_B_T[:, 0], torch.tensor(0.1)) and torch.all(t_B_T[:, 1:] == float(t))


def test_unipc_solver_through_the_node_matches_the_loop():
    """cosmos.sampler with solver unipc = FlowVideo2World on the Karras schedule from the node's seed."""
    from engine.node import Step
    from nodes.cosmos.node import CosmosSamplerNode

    model = _tiny_predict25()
    text, negative = torch.randn(1, 5, 12), torch.randn(1, 5, 12)
    node = CosmosSamplerNode("sampler", {"solver": "unipc", "num_steps": 3, "frames": 9, "latent_height": 4,
                                         "latent_width": 6, "guidance": 2.0, "seed": 3}, "cpu")
    out = node.run({"model": model, "text": text, "negative": negative}, None, Step(0, {}))["latent"]
    fv = FlowVideo2World(model)
    with torch.no_grad():
        fn = fv.velocity_fn(model.prepare_cross(text), model.prepare_cross(negative), 2.0)
        ref = fv.sample(fn, (1, 4, 3, 4, 6), 3, flow_schedule("karras", 3, sigma_min=0.01, sigma_max=200.0))
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
    assert math.isfinite(float(out.abs().max()))


def test_predict25_dit_with_t5_width_text_is_refused():
    from engine.errors import FdError
    from engine.node import Step
    from nodes.cosmos.node import CosmosSamplerNode

    node = CosmosSamplerNode("sampler", {"solver": "unipc", "num_steps": 1, "frames": 5, "latent_height": 4,
                                         "latent_width": 6}, "cpu")
    with pytest.raises(FdError, match="Cosmos-Reason1 features.*width 12"):
        node.run({"model": _tiny_predict25(), "text": torch.zeros(1, 5, 8)}, None, Step(0, {}))
