"""GPU proof that CUDA-graph replay equals eager: causal DiT rollout, Wan VAE stream, TAEHV.

Full Wan2.1-1.3B widths at 480x832 (fewer layers, to stay quick), random bf16 weights.
Eager forward_causal and the captured CausalDenoiser run the same rollout on separate
caches; every block's clean latents must agree to bf16 rounding and the graphs must
actually have replayed (the window fills, then one graph serves every later block).
Run as a script (exit code 1 on failure) or under pytest.
"""
from __future__ import annotations

import sys
from dataclasses import replace

import torch

from benchmarks.common import LATENT_HW, build_dit, log, rel_err
from benchmarks.w1_selfforcing import FPB, TaehvStream, build_decoders, channels_last_taehv
from nodes.ar.rollout import ARRollout
from nodes.ar.schedule import ARSchedule
from nodes.samplers.flow_match import FlowMatchTable
from nodes.wan.config import WAN_1_3B
from nodes.wan.causal import CausalDenoiser
from nodes.common.kv_cache import SelfKVCache
from nodes.wan.vae_stream import StreamingDecoder

TOL = 2e-2  # bf16 operands; the same kernels run in both paths, so in practice far smaller


def _rollout(m, den_fn, blocks, seed=0):
    schedule = ARSchedule.build(FlowMatchTable(shift=5.0), [1000, 750, 500, 250])
    roll = ARRollout(den_fn, schedule, FPB, None, seed=seed)
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [roll.step(torch.randn(1, FPB, 16, *LATENT_HW, generator=g, device="cuda")).float() for _ in range(blocks)]


def check_dit(layers=6, blocks=9, sink=0, window=21, rope_mode="absolute", compile_=False):
    m = build_dit(replace(WAN_1_3B, num_layers=layers))
    cfg, ft = m.cfg, LATENT_HW[0] * LATENT_HW[1] // 4
    ctx = torch.randn(1, 512, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    cross = m.prepare_cross(ctx)

    def cache():
        return SelfKVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim, ft, sink_frames=sink, window_frames=window,
                           rope_mode=rope_mode, dtype=torch.bfloat16, device="cuda")

    with torch.no_grad():
        ref_cache = cache()
        ref = _rollout(m, lambda x, t, f: m.forward_causal(x, t, cross, ref_cache, f), blocks)
        m.compile_elementwise(compile_)
        den = CausalDenoiser(m, cache(), cross, graphs=True)
        if compile_:  # also prove the capture-everything-first path
            den.prepare(torch.zeros(1, FPB, 16, *LATENT_HW, device="cuda"))
        got = _rollout(m, den, blocks)
        # a prompt switch mid-rollout: copied into the static buffers, no re-capture
        other = m.prepare_cross(ctx.flip(1))
        before = den.graphs.stats.captured
        den.set_prompt(other)
        x, t = torch.randn(1, FPB, 16, *LATENT_HW, device="cuda"), torch.full((1, FPB), 500.0, device="cuda")
        ref_switch = m.forward_causal(x, t, other, ref_cache, blocks * FPB)
        got_switch = den(x, t, blocks * FPB)
        m.compile_elementwise(False)
    errs = [rel_err(a, b) for a, b in zip(got, ref)]
    rec = {"check": "dit", "layers": layers, "sink": sink, "rope_mode": rope_mode, "compile": compile_,
           "rel_err_per_block": [round(e, 6) for e in errs], "prompt_switch_rel_err": rel_err(got_switch, ref_switch),
           "recaptured_on_switch": den.graphs.stats.captured - before, "graphs": den.graph_status(),
           "graphs_captured": den.graphs.stats.captured, "replays": den.graphs.stats.replayed}
    rec["ok"] = (max(errs) < TOL and rec["prompt_switch_rel_err"] < TOL and rec["recaptured_on_switch"] == 0
                 and den.graphs.stats.replayed > 0 and den.graphs.stats.captured == window // FPB)
    log(rec, "gpu_check.jsonl")
    return rec["ok"]


def check_decoders(chunks=4):
    vae, tae = build_decoders()
    tae = channels_last_taehv(tae)
    g = torch.Generator(device="cuda").manual_seed(5)
    lats = [torch.randn(1, FPB, 16, *LATENT_HW, generator=g, device="cuda") for _ in range(chunks)]
    ok = True
    with torch.no_grad():
        for name, make in (("wan", lambda gr: StreamingDecoder(vae, zero_init=True, clamp=True, graphs=gr)),
                           ("taehv", lambda gr: TaehvStream(tae, gr))):
            outs = {}
            for graphs in (False, True):
                dec = make(graphs)
                res = []
                for z in lats:
                    if name == "wan":
                        z = z.permute(0, 2, 1, 3, 4).to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
                        res.append(dec.decode_chunk(z).float())
                    else:
                        res.append(dec(z).float())
                outs[graphs] = (res, dec.graphs.stats)
            errs = [rel_err(a, b) for a, b in zip(outs[True][0], outs[False][0])]
            st = outs[True][1]
            rec = {"check": name, "rel_err_per_chunk": [round(e, 6) for e in errs], "graphs": st.describe(),
                   "ok": max(errs) < TOL and st.replayed >= 1}
            ok &= rec["ok"]
            log(rec, "gpu_check.jsonl")
    return ok


def test_gpu_graph_replay_equals_eager():
    assert torch.cuda.is_available()
    torch.backends.cudnn.benchmark = True
    assert check_dit()
    assert check_dit(sink=3, window=21, rope_mode="relative")
    assert check_dit(compile_=True)
    assert check_decoders()


if __name__ == "__main__":
    try:
        test_gpu_graph_replay_equals_eager()
    except AssertionError as e:
        print("GPU CHECK FAILED", e)
        sys.exit(1)
    print("GPU CHECK OK")
