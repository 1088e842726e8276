"""Kernel profile of one causal DiT forward at W1 block 5 (4,680 query tokens, 28,080 attended),
compiled elementwise stages, run eagerly (same kernels a replay runs): where the time goes.

  python -m benchmarks.profile_dit [--fast] [--block 8] [--top 30]
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import LATENT_HW, build_dit, log
from nodes.common.kv_cache import SelfKVCache

FPB, BLOCK = 3, 5


def category(name: str) -> str:
    n = name.lower()
    if "cudnn" in n or "fmha" in n or "flash" in n or "attn" in n or "sdpa" in n:
        return "attention"
    if "gemm" in n or "sm90" in n or "cutlass" in n or "nvjet" in n or "xmma" in n:
        return "matmul"
    if "triton" in n:
        return "fused elementwise (inductor)"
    if "index" in n or "copy" in n:
        return "copies / cache writes"
    return "other elementwise"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--block", type=int, default=BLOCK, help="block index (7+: the steady, full 21-frame window)")
    ap.add_argument("--fast", action="store_true", help="self_forcing_fast's DiT: FP8 linears, FP8 attention "
                    "(tensor scales), FP8 KV cache at one running scale per layer")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    m = build_dit().compile_elementwise(True)
    cfg, ft = m.cfg, LATENT_HW[0] * LATENT_HW[1] // 4
    kv = dict(dtype=torch.bfloat16)
    if args.fast:
        from nodes.common.fp8_attention import CudnnFp8Attention
        m.use_fp8_linears()
        m.use_fp8_attention("tensor", "fp8", CudnnFp8Attention("fp8"))
        kv = dict(dtype=torch.float8_e4m3fn, fp8_scaling="tensor", read_dtype=torch.bfloat16)
    cache = SelfKVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim, ft, window_frames=21, device="cuda", **kv)
    cache.quant, cache.dequant, cache.quant_running = m.kernels.quant_rows, m.kernels.dequant, m.kernels.quant_running
    cross = m.prepare_cross(torch.randn(1, 512, 4096, device="cuda"))
    x, t = torch.randn(1, FPB, 16, *LATENT_HW, device="cuda"), torch.full((1, FPB), 500.0, device="cuda")
    block = args.block
    with torch.no_grad():
        for _ in range(3):
            m.forward_causal(x, t, cross, cache, block * FPB)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m.forward_causal(x, t, cross, cache, block * FPB)
            torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "device_time_total", 0)]
    per_cat, rows = defaultdict(float), []
    for e in kernels:
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us <= 0 or e.key.startswith("cuda") or "Memcpy" in e.key and False:
            continue
        per_cat[category(e.key)] += us / 1e3
        rows.append((us / 1e3, e.count, e.key[:110]))
    rows.sort(reverse=True)
    total = sum(per_cat.values())
    log({"kind": "profile", "block": block, "fast": args.fast, "total_kernel_ms": round(total, 2),
         "by_category_ms": {k: round(v, 2) for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])},
         "top": [{"ms": round(ms, 2), "calls": c, "kernel": k} for ms, c, k in rows[:args.top]]}, "profile.jsonl")
    print(f"\nkernel time of one block-{block} forward ({'fast' if args.fast else 'bf16'}): {total:.1f} ms")
    for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {k:32} {v:7.1f} ms")
    for ms, c, k in rows[:args.top]:
        print(f"  {ms:7.2f} ms {c:4d}x {k}")


if __name__ == "__main__":
    main()
