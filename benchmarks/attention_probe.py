"""Attention backends at fd's shapes, one JSON line per (shape, backend): ms (CUDA events, median of 20 after
warm-up), TFLOP/s (4·Lq·Lk·H·D per call), and the output's relative error and max abs error against the float32
formula on the same inputs. The first call of each backend is timed apart: FlashAttention-4 compiles its kernel
then (JIT), and that is the cold-start cost a session pays once per shape.

    python3 -m benchmarks.attention_probe [--backends flash4,cudnn,flash,cudnn_fp8] [--dry]

--dry runs tiny shapes on whatever device is there (CPU: math only), to check the script itself.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from benchmarks.common import events_ms
from nodes.common.attention import _explicit_with_lse, attention, flash4_available

# name -> (query tokens, key tokens, heads, head dim)
SHAPES = {
    "w1_block5": (4680, 28080, 12, 128),
    "w1_steady": (4680, 32760, 12, 128),
    "wan14b": (4680, 32760, 40, 128),
}
DRY_SHAPES = {"dry": (64, 192, 2, 32)}


def timed(fn):
    return events_ms(fn, reps=20, warmup=3)[0]


def reference(q, k, v):
    outs = []
    for h in range(0, q.shape[2], 4):
        sl = slice(h, h + 4)
        outs.append(_explicit_with_lse(q[:, :, sl].float(), k[:, :, sl].float(), v[:, :, sl].float(),
                                       1 / math.sqrt(q.shape[-1]), None)[0])
    return torch.cat(outs, 2)


def cudnn_fp8(q, k, v):
    """fd's own cuDNN sdpa_fp8 runner (nodes/common/fp8_attention.py), per-tensor scales, fp8 output, with the
    Q/K/V quantisation outside the timed call (what the kernel costs; fp8_ops times it with quantisation)."""
    from nodes.common.fp8_attention import CudnnFp8Attention, quantized_qkv
    runner, qq = CudnnFp8Attention(out="fp8"), quantized_qkv(q, k, v, "tensor")
    scale = 1 / math.sqrt(q.shape[-1])
    return (lambda: runner(qq, scale)), (lambda: runner(qq, scale))


def probe(name, shape, backend, dev):
    lq, lk, h, d = shape
    gen = torch.Generator(device=dev).manual_seed(0)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    q, k, v = (torch.randn(1, n, h, d, device=dev, dtype=dtype, generator=gen) for n in (lq, lk, lk))
    row = {"shape": name, "lq": lq, "lk": lk, "heads": h, "head_dim": d, "backend": backend}
    if backend == "cudnn_fp8":
        run, result = cudnn_fp8(q, k, v)
    else:
        def run():
            return attention(q, k, v, backend)
        result = run
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    if dev == "cuda":
        torch.cuda.synchronize()
    row["first_call_s"] = round(time.perf_counter() - t0, 3)
    out = result().float()
    ref = reference(q, k, v)
    row["rel_err"] = ((out - ref).norm() / ref.norm()).item()
    row["max_abs_err"] = (out - ref).abs().max().item()
    if dev == "cuda":
        ms = timed(run)
        row["ms"] = round(ms, 4)
        row["tflops"] = round(4 * lq * lk * h * d / ms / 1e9, 1)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="flash4,cudnn,flash,cudnn_fp8")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--dry", action="store_true")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = DRY_SHAPES if a.dry else {n: SHAPES[n] for n in a.shapes.split(",")}
    backends = a.backends.split(",") if dev == "cuda" else ["math"]
    if dev == "cuda":
        print(json.dumps({"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
                          "flash4": flash4_available(), "torch": torch.__version__}), flush=True)
    for name, shape in shapes.items():
        for backend in backends:
            try:
                print(json.dumps(probe(name, shape, backend, dev)), flush=True)
            except Exception as e:  # noqa: BLE001 - a backend that can't run at a shape is a result too
                print(json.dumps({"shape": name, "backend": backend, "error": f"{type(e).__name__}: {e}"[:400]}),
                      flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
