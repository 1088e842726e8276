"""OmniDreams' diffusion-forcing AR teacher (``tiny_omnidreams_dfar``: ``ar.sampler`` with ``unipc_steps``,
``omnidreams.dit`` with ``guidance``) against a hand-written loop through the model's own forward.

No golden exists for the teacher (its checkpoint is internal), so the reference re-derives what FlashDreams'
``SV_35STEPS_CHUNK2_LOC24_COSMOS2_2B_RES720P_30FPS_HDMAP_VAE_MADS1M`` does (``DiffusionModel.generate`` /
``finalize`` with ``FlowMatchUniPCScheduler`` and ``CosmosTransformer`` CFG), written independently here:

- per block: initial noise from the seeded generator; UniPC-bh2 (order 1 first, 2 in between, 1 last) over
  ``set_timesteps(N, shift)`` with the predictor/corrector coefficients computed below in float64 from the
  log-SNR (not through ``nodes.samplers.unipc``); the network sees the int64 schedule timesteps;
- every call runs a conditional and an unconditional branch, each against its own KV cache, combined as
  ``uncond + g (cond - uncond)``;
- the context pass: the next generator draw, sigma = the schedule's sigma nearest t=128, network at t=128
  (both branches, so both caches advance).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import engine
from engine.errors import FdError
from nodes.common.kv_cache import SelfKVCache


def unipc_schedule(n: int, shift: float) -> tuple[list[int], list[float]]:
    """(int64 timesteps [n], sigmas [n + 1] ending in 0) of set_timesteps(n, shift) on the 1000-step table."""
    train = 1.0 - np.linspace(1.0, 1.0 / 1000, 1000)[::-1]
    s = np.linspace(train[0], train[-1], n + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    return [int(v) for v in (s * 1000).astype(np.int64)], [float(np.float32(v)) for v in s] + [0.0]


def lam(s: float) -> float:
    return math.log(1 - s) - math.log(s)


def unipc_solve(x: torch.Tensor, sig: list[float], ts: list[int], predict) -> torch.Tensor:
    """UniPC-bh2 in x0 form, written from the formulas (Zhao et al. 2023, B(h) = expm1(h))."""
    n = len(ts)
    hist: list[torch.Tensor] = []          # x0 predictions, newest last
    last = None
    for i in range(n):
        m = x - sig[i] * predict(x, ts[i])
        if i >= 1:                         # corrector from sigma[i-1] to sigma[i] with the new model output
            s0, st = sig[i - 1], sig[i]
            h = lam(st) - lam(s0)
            a, bh = (1 - st), math.expm1(-h)
            base = (st / s0) * last - a * bh * hist[-1]
            if i == 1:
                x = base - a * bh * 0.5 * (m - hist[-1])
            else:
                rk = (lam(sig[i - 2]) - lam(s0)) / h
                hh = -h
                k0 = math.expm1(hh) / hh - 1
                b0, b1 = k0 / bh, 2 * (k0 / hh - 0.5) / bh
                r0, r1 = (b0 - b1) / (1 - rk), (b1 - rk * b0) / (1 - rk)
                x = base - a * bh * (r0 * (hist[-2] - hist[-1]) / rk + r1 * (m - hist[-1]))
        hist = (hist + [m])[-2:]
        last = x
        s0, st = sig[i], sig[i + 1]
        if st == 0:                        # the final step lands on its x0 prediction
            x = m
            continue
        h = lam(st) - lam(s0)
        a, bh = (1 - st), math.expm1(-h)
        x_next = (st / s0) * x - a * bh * m
        if 0 < i < n - 1:                  # order 2 between the order-1 first and last steps
            rk = (lam(sig[i - 1]) - lam(s0)) / h
            x_next = x_next - a * bh * 0.5 * (hist[-2] - m) / rk
        x = x_next
    return x


def reference(net, text, negative, hdmaps, *, blocks, nfpb, window, steps, shift, guidance, ctx_t, seed, shape):
    C, H, W = shape
    cfg = net.cfg
    k, kt = cfg.patch_spatial, cfg.patch_temporal

    def cache():
        return SelfKVCache(cfg.num_blocks, cfg.num_heads, cfg.head_dim, (H // k) * (W // k),
                           window_frames=window // kt, batch_size=1)
    caches = [cache(), cache()]
    with torch.no_grad():
        cross = [net.prepare_cross(text), net.prepare_cross(negative)]
    ts, sig = unipc_schedule(steps, shift)
    sig_ctx = sig[int(np.argmin(np.abs(np.array(ts, dtype=np.float64) - ctx_t)))]
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 1, nfpb, H, W)

    def flow(x, t, b, hd):
        plan = caches[0].plan(b * nfpb // kt, nfpb // kt)
        tt = torch.full((1,), float(t))
        with torch.no_grad():
            c, u = (net.forward_chunk(x.transpose(1, 2), tt, hd.transpose(1, 2), cr, condition_mask=mask,
                                      cache=ca, plan=plan).transpose(1, 2).float()
                    for cr, ca in zip(cross, caches))
        return u + guidance * (c - u)

    out = []
    for b in range(blocks):
        noise = torch.randn((1, nfpb, C, H, W), generator=g)
        clean = unipc_solve(noise, sig, ts, lambda x, t: flow(x, t, b, hdmaps[b]))
        draw = torch.randn((nfpb, C, H, W), generator=g).reshape(1, nfpb, C, H, W)
        flow((1 - sig_ctx) * clean + sig_ctx * draw, ctx_t, b, hdmaps[b])
        out.append(clean)
    return torch.cat(out, 1)


STEPS = 6


def test_teacher_rollout_equals_the_hand_written_loop():
    pipe = engine.load("tiny_omnidreams_dfar", overrides=[f"nodes.sampler.params.unipc_steps={STEPS}",
                                                          "inputs.num_blocks=4"])
    pipe.load()
    sp, dp = vars(pipe.nodes["sampler"].p), vars(pipe.nodes["dit"].p)
    assert sp["num_blocks"] * sp["frames_per_block"] > sp["window_frames"]      # the window evicts
    assert dp["guidance"] != 1 and sp["context_noise"] > 0
    with pipe.open_session() as s:
        outs = [s.step().outputs for _ in range(sp["num_blocks"])]
        text, neg = s.values["text"]["embeds"], s.values["text"]["negative_embeds"]
    got = torch.cat([o["sampler"]["latent"] for o in outs], 1)
    want = reference(pipe.nodes["dit"].model, text, neg, [o["hdmap"]["latent"] for o in outs],
                     blocks=sp["num_blocks"], nfpb=sp["frames_per_block"], window=sp["window_frames"],
                     steps=STEPS, shift=sp["shift"], guidance=dp["guidance"], ctx_t=sp["context_noise"],
                     seed=pipe.plan.spec.inputs["seed"], shape=(sp["latent_channels"], sp["latent_height"],
                                                                sp["latent_width"]))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_reference_pieces_are_not_vacuous():
    """35 steps at shift 5 end at t = 128 (the teacher's context timestep); guidance and the context pass
    each change the result (so the comparison above checks them)."""
    ts, sig = unipc_schedule(35, 5.0)
    assert ts[-1] == 128 and sig[-1] == 0 and len(sig) == 36
    base = ["nodes.sampler.params.unipc_steps=3", "inputs.num_blocks=2"]
    outs = {}
    for name, extra in {"cfg3": [], "cfg1": ["nodes.dit.params.guidance=1.0"],
                        "ctx0": ["nodes.sampler.params.context_noise=0"]}.items():
        with engine.load("tiny_omnidreams_dfar", overrides=base + extra).load().open_session() as s:
            outs[name] = torch.cat([s.step().outputs["sampler"]["latent"] for _ in range(2)], 1)
    assert not torch.allclose(outs["cfg3"], outs["cfg1"], atol=1e-3)
    assert not torch.allclose(outs["cfg3"][:, 2:], outs["ctx0"][:, 2:], atol=1e-3)
    torch.testing.assert_close(outs["cfg3"][:, :2], outs["ctx0"][:, :2], atol=0, rtol=0)   # block 0: no history


def test_guidance_without_a_negative_prompt_is_refused_before_loading(tmp_path):
    import yaml
    from pathlib import Path
    spec = yaml.safe_load((Path(__file__).parents[1] / "specs" / "tiny_omnidreams_dfar.yaml").read_text())
    del spec["nodes"]["dit"]["in"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(FdError, match="needs negative prompt embeddings"):
        engine.load(tmp_path / "s.yaml").load()


def test_unipc_steps_and_two_experts_exclude_each_other():
    with pytest.raises((FdError, ValueError), match="exclude each other"):
        engine.load("tiny_omnidreams_dfar", overrides=["nodes.sampler.params.boundary_ratio=0.875"]).build()
