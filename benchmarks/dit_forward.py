"""Issue 3's numbers: one Wan2.1-1.3B DiT forward over 21 latent frames at 480x832
(32,760 tokens) with and without CFG (batch 2), and the Wan VAE decode of the same
21 latent frames; milliseconds and achieved TFLOP/s against the measured ceilings.

  python -m benchmarks.dit_forward
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import LATENT_HW, build_dit, dit_forward_tflop, env, events_ms, log
from benchmarks.w1_selfforcing import build_decoders

FRAMES = 21


def main():
    torch.backends.cudnn.benchmark = True
    m = build_dit()
    cfg = m.cfg
    tokens = FRAMES * LATENT_HW[0] * LATENT_HW[1] // 4
    ctx = torch.randn(2, 512, 4096, device="cuda")
    rows = []
    with torch.no_grad():
        for compile_ in (False, True):
            m.compile_elementwise(compile_)
            for batch in (1, 2):
                cross = m.prepare_cross(ctx[:batch])
                x = torch.randn(batch, 16, FRAMES, *LATENT_HW, device="cuda")
                t = torch.full((batch,), 500.0, device="cuda")
                ms, _ = events_ms(lambda: m(x, t, None, cross=cross), reps=3, warmup=2)
                tf = dit_forward_tflop(cfg, tokens, tokens, batch)
                rows.append({"what": f"dit_forward_21f{' cfg(b=2)' if batch == 2 else ''}"
                                     f"{' +compile' if compile_ else ''}", "ms": round(ms, 1),
                             "tflop": round(tf, 2), "tflops_per_s": round(tf / ms * 1e3, 1)})
                log(rows[-1], "dit_forward.jsonl")
        m.compile_elementwise(False)
        del m
        torch.cuda.empty_cache()
        vae, _ = build_decoders()
        lat = torch.randn(1, 16, FRAMES, *LATENT_HW, device="cuda", dtype=torch.bfloat16)
        lat = lat.contiguous(memory_format=torch.channels_last_3d)
        with FlopCounterMode(display=False) as fc:
            vae.decode(lat[:, :, :4], chunk=1)
        ms, _ = events_ms(lambda: vae.decode(lat, chunk=1), reps=2, warmup=1)
        # FLOPs of the whole 21-frame decode from one 4-frame count: frame 0 is cheaper (1 pixel frame)
        first = FlopCounterMode(display=False)
        with first:
            vae.decode(lat[:, :, :1], chunk=1)
        per_frame = (fc.get_total_flops() - first.get_total_flops()) / 3
        tf = (first.get_total_flops() + per_frame * (FRAMES - 1)) / 1e12
        rows.append({"what": "wan_vae_decode_21f (chunk=1, bf16, channels_last_3d)", "ms": round(ms, 1),
                     "tflop": round(tf, 2), "tflops_per_s": round(tf / ms * 1e3, 1)})
        log(rows[-1], "dit_forward.jsonl")
    log({"kind": "env", **env()}, "dit_forward.jsonl")
    print(f"\n{'what':58} {'ms':>8} {'TFLOP':>7} {'TFLOP/s':>8}")
    for r in rows:
        print(f"{r['what']:58} {r['ms']:8.1f} {r['tflop']:7.2f} {r['tflops_per_s']:8.1f}")


if __name__ == "__main__":
    main()
