"""One streamed block through each video decoder on one GPU: the Wan VAE stream and TAEHV.

A block is 3 latent frames at 60x104 (480x832 pixels) -> 12 frames, bf16, random weights
(benchmarks.w1_selfforcing.build_decoders). The Wan VAE runs as Self-Forcing's demo stream
(zero caches, clamped); TAEHV in exact mode with its MemBlock memory carried.

For every variant: the same 4 latent blocks are decoded by the variant and by the eager
reference stream (plain formulation, no graphs, no compile) and the relative error per
block is printed; then the variant's steady block is timed with CUDA events (warmup first,
median of --reps), graphs replaying where the variant has them. TFLOP/s is the reference
formulation's FLOPs (FlopCounterMode) over the time, so variants that do less work show as
a higher effective rate. --profile prints a torch.profiler kernel breakdown by category
for the named variants (run eagerly, graphs off: the kernels are the same).

  python -m benchmarks.vae_decode                      # all variants, profile of ref and best
  python -m benchmarks.vae_decode --decoders taehv --variants ref,compile
"""
from __future__ import annotations

import argparse
import copy
import gc
import time
from collections import defaultdict

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import LATENT_HW, env, events_ms, log, rel_err
from benchmarks.w1_selfforcing import FPB, build_decoders, channels_last_taehv
from nodes.common.conv import cudnn_autotune
from nodes.taehv.stream import StreamingTAEHVDecoder
from nodes.wan.vae_stream import StreamingDecoder

# name -> StreamingDecoder / StreamingTAEHVDecoder keyword arguments
WAN_VARIANTS = {
    "ref_noautotune": dict(fused=False, graphs=True, autotune=False),
    "ref": dict(fused=False, graphs=True),
    "fused": dict(fused=True, graphs=True),
    "compile_nofast": dict(fused=True, compile=True, graphs=True, fast_convs=False),   # the 2026-12-06 default
    "compile": dict(fused=True, compile=True, graphs=True),     # + time-folded 96-ch convs, tap-sum head
}
TAEHV_VARIANTS = {
    "ref_eager": dict(graphs=False),
    "ref": dict(graphs=True),
    "fused": dict(fused=True, graphs=True),
    "compile_ref": dict(compile=True, graphs=True),
    "compile": dict(fused=True, compile=True, graphs=True),
    "compile_cl": dict(fused=True, compile=True, graphs=True, channels_last=True),
}
CATEGORIES = (  # first match wins, on the lower-cased kernel name
    ("conv (cuDNN)", ("conv", "xmma", "implicit", "cudnn", "sm90_", "fprop", "dgrad", "nhwc", "wgrad")),
    ("attention", ("fmha", "flash", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass")),
    ("inductor fused", ("triton",)),
    ("cat / copy / layout", ("cat", "copy", "transpose", "permute", "contiguous", "nchw", "scatter")),
    ("norm", ("norm",)),
    ("upsample", ("upsample", "interp")),
    ("elementwise", ("elementwise", "vectorized", "silu", "add", "mul", "tanh", "relu", "clamp", "fill")),
)


def _make(decoder: str, model, kw: dict):
    if kw.pop("channels_last", False):
        model = channels_last_taehv(model)
    if decoder == "wan":
        return StreamingDecoder(model, zero_init=True, clamp=True, **kw)
    return StreamingTAEHVDecoder(model, mode="exact", **kw)


class _Run:
    """A stream of one decoder: call() decodes the next block (latents given as [B, f, C, h, w])."""

    def __init__(self, decoder, model, kw):
        self.decoder, self.dec = decoder, _make(decoder, model, dict(kw))
        self.dtype = next(model.parameters()).dtype
        self.state = None if decoder == "wan" else self.dec.new_state()

    def __call__(self, z):
        if self.decoder == "wan":
            z = z.permute(0, 2, 1, 3, 4).to(self.dtype).contiguous(memory_format=torch.channels_last_3d)
            return self.dec.decode_chunk(z)
        return self.dec.decode(self.state, z)

    def graph_status(self):
        return self.dec.graphs.status()


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile(decoder, model, kw, lats, label):
    """Kernel time per category for one steady block (eager dispatch of the same kernels)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    run = _Run(decoder, model, {**kw, "graphs": False})
    for z in lats[:2]:
        run(z)
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        run(lats[2])
        torch.cuda.synchronize()
    per_cat, per_kernel = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us = ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
            per_cat[_category(ev.name)] += us / 1e3
            per_kernel[ev.name][0] += us / 1e3
            per_kernel[ev.name][1] += 1
    total = sum(per_cat.values())
    log({"profile": f"{decoder}/{label}", "kernel_ms": round(total, 2),
         "by_category_ms": {k: round(v, 2) for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])},
         "top_kernels": [[n[:90], round(t, 2), c] for n, (t, c) in
                         sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:12]]}, "vae_decode.jsonl")


def bench_decoder(decoder, model, variants, lats, reps, profile_names):
    with torch.no_grad():
        ref_run = _Run(decoder, model, dict(fused=False, graphs=False))
        ref = [ref_run(z).float() for z in lats]
        with FlopCounterMode(display=False) as fc:
            ref_run(lats[0])
        tflop = fc.get_total_flops() / 1e12
        del ref_run
        model32 = copy.deepcopy(model).float()
        ref32 = [_Run(decoder, model32, dict(fused=False, graphs=False))(z).float() for z in lats[:1]]
        del model32
        ref32_err = rel_err(ref[0], ref32[0])
        log({"decoder": decoder, "eager_ref_bf16_vs_fp32_rel_err": f"{ref32_err:.2e}"}, "vae_decode.jsonl")
        table = {}
        for name, kw in variants.items():
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run = _Run(decoder, model, kw)
            outs = [run(z).float() for z in lats]
            torch.cuda.synchronize()
            cold = time.perf_counter() - t0
            errs = [rel_err(a, b) for a, b in zip(outs, ref)]
            err32 = rel_err(outs[0], ref32[0])
            del outs
            ms, times = events_ms(lambda: run(lats[-1]), reps=reps, warmup=3)
            rec = {"decoder": decoder, "variant": name, "kw": kw, "ms": round(ms, 2),
                   "ms_min": round(min(times), 2), "ms_max": round(max(times), 2), "tflop": round(tflop, 2),
                   "tflops_per_s": round(tflop / ms * 1e3, 1), "rel_err_vs_eager_ref": [f"{e:.2e}" for e in errs],
                   "rel_err_vs_fp32_block0": f"{err32:.2e}", "eager_ref_vs_fp32_block0": f"{ref32_err:.2e}",
                   "cold_s_4_blocks": round(cold, 1), "graphs": run.graph_status(),
                   "peak_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}
            log(rec, "vae_decode.jsonl")
            table[name] = rec
            del run
        for name in profile_names:
            if name in variants:
                profile(decoder, model, variants[name], lats, name)
    return table


# (cin, cout, frames in, h, w, kernel (t, k)) of a steady Wan block: the 3x3x3 convs (frames include the
# 2 of history) and the sub-pixel 2x2 upsample convs (4 phases stacked on cout)
PROBE_SHAPES = ((384, 384, 5, 60, 104, (3, 3)), (384, 384, 8, 120, 208, (3, 3)), (192, 192, 14, 240, 416, (3, 3)),
                (96, 96, 14, 480, 832, (3, 3)), (384, 768, 6, 60, 104, (1, 2)), (384, 768, 12, 120, 208, (1, 2)),
                (192, 384, 12, 240, 416, (1, 2)), (96, 3, 14, 480, 832, (3, 3)), (96, 16, 14, 480, 832, (3, 3)),
                # the 96-channel stage with zero-padded channels (cuDNN tiles of 64/128 outputs; unmeasured so far)
                (96, 128, 14, 480, 832, (3, 3)), (128, 128, 14, 480, 832, (3, 3)))


def probe_convs():
    """Rates of the decoder's conv shapes as cuDNN runs them: conv3d channels_last_3d, versus the
    same FLOPs as a per-frame conv2d (time taps folded into input channels for 3x3x3; frames folded
    into the batch for the 2x2 ones), channels_last. bf16, cudnn.benchmark on."""
    with cudnn_autotune():
        _probe_convs()


def _probe_convs():
    import torch.nn.functional as F
    for cin, cout, t, h, w, (kt, k) in PROBE_SHAPES:
        to = t - kt + 1
        x = torch.randn(1, cin, t, h, w, device="cuda", dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last_3d)
        w3 = torch.randn(cout, cin, kt, k, k, device="cuda", dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last_3d)
        pad = (0, 1, 1) if k == 3 else (0, 1, 1)
        flops = 2 * cout * cin * kt * k * k * to * (h + (k == 2)) * (w + (k == 2))
        ms3, _ = events_ms(lambda: F.conv3d(x, w3, None, padding=pad), reps=10, warmup=3)
        x2 = torch.randn(to, cin * kt, h, w, device="cuda", dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        w2 = torch.randn(cout, cin * kt, k, k, device="cuda", dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        ms2, _ = events_ms(lambda: F.conv2d(x2, w2, None, padding=1), reps=10, warmup=3)
        log({"probe": [cin, cout, t, h, w, kt, k], "conv3d_ms": round(ms3, 3), "conv3d_tflops": round(flops / ms3 / 1e9),
             "conv2d_folded_ms": round(ms2, 3), "conv2d_folded_tflops": round(flops / ms2 / 1e9)}, "vae_decode.jsonl")
        del x, x2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--decoders", default="taehv,wan")
    ap.add_argument("--variants", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--profile", default="ref,compile", help="variants to profile ('' for none)")
    ap.add_argument("--probe", action="store_true", help="also time the decoder's conv shapes, 3d vs folded 2d")
    args = ap.parse_args()
    log({"env": env(), "latent": [1, FPB, 16, *LATENT_HW], "cudnn_benchmark": torch.backends.cudnn.benchmark},
        "vae_decode.jsonl")
    vae, tae = build_decoders()
    g = torch.Generator(device="cuda").manual_seed(5)
    lats = [torch.randn(1, FPB, 16, *LATENT_HW, generator=g, device="cuda") for _ in range(4)]
    if args.probe:
        probe_convs()
    pick = [v for v in args.variants.split(",") if v]
    prof = [v for v in args.profile.split(",") if v]
    rows = []
    for decoder in args.decoders.split(","):
        variants = WAN_VARIANTS if decoder == "wan" else TAEHV_VARIANTS
        variants = {k: v for k, v in variants.items() if not pick or k in pick}
        model = vae if decoder == "wan" else tae
        rows += bench_decoder(decoder, model, variants, lats, args.reps, prof).values()
    print(f"{'decoder':8} {'variant':15} {'ms':>8} {'TFLOP/s':>8} {'cold s':>7} {'vs eager ref':>12} "
          f"{'vs fp32':>8} {'(ref vs fp32)':>13}")
    for r in rows:
        print(f"{r['decoder']:8} {r['variant']:15} {r['ms']:8.2f} {r['tflops_per_s']:8.1f} {r['cold_s_4_blocks']:7.1f} "
              f"{max(float(e) for e in r['rel_err_vs_eager_ref']):12.2e} {r['rel_err_vs_fp32_block0']:>8} "
              f"{r['eager_ref_vs_fp32_block0']:>13}")


if __name__ == "__main__":
    main()
