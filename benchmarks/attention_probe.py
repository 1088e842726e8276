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
import statistics
import time

import torch

from nodes.common.attention import _explicit_with_lse, attention, flash4_available

# name -> (query tokens, key tokens, heads, head dim)
SHAPES = {
    "w1_block5": (4680, 28080, 12, 128),
    "w1_steady": (4680, 32760, 12, 128),
    "wan14b": (4680, 32760, 40, 128),
}
DRY_SHAPES = {"dry": (64, 192, 2, 32)}
E4M3_MAX = 448.0


def timed(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def reference(q, k, v):
    outs = []
    for h in range(0, q.shape[2], 4):
        sl = slice(h, h + 4)
        outs.append(_explicit_with_lse(q[:, :, sl].float(), k[:, :, sl].float(), v[:, :, sl].float(),
                                       1 / math.sqrt(q.shape[-1]), None)[0])
    return torch.cat(outs, 2)


def cudnn_fp8(q, k, v):
    """Per-tensor e4m3 SDPA through the cuDNN frontend graph API (Hopper: fp8 output too), on contiguous
    [B, H, L, D] copies. Returns a callable that runs it and one that dequantises the output to [B, L, H, D]."""
    import cudnn

    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    b, h, sq, d = qt.shape

    def quant(x):
        s = (x.abs().amax().float() / E4M3_MAX).reshape(1, 1, 1, 1)
        return (x.float() / s).to(torch.float8_e4m3fn), s

    (qf, sq_), (kf, sk_), (vf, sv_) = quant(qt), quant(kt), quant(vt)
    one = torch.ones(1, 1, 1, 1, device=q.device)
    scale_s, descale_s = one * E4M3_MAX, one / E4M3_MAX
    scale_o = (E4M3_MAX / vt.abs().amax().float()).reshape(1, 1, 1, 1)   # |out| <= max|v|: a safe output scale
    o = torch.empty(b, h, sq, d, device=q.device, dtype=torch.float8_e4m3fn)
    amax_s, amax_o = torch.empty_like(one), torch.empty_like(one)

    g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)

    def t(x, dt):
        return g.tensor(dim=list(x.shape), stride=list(x.stride()), data_type=dt)

    tq, tk, tv = t(qf, e4m3), t(kf, e4m3), t(vf, e4m3)
    tdq, tdk, tdv, tds, tss, tso = (t(one, f32) for _ in range(6))
    to, _, tas, tao = g.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=tdq, descale_k=tdk, descale_v=tdv, descale_s=tds,
                                 scale_s=tss, scale_o=tso, generate_stats=False, attn_scale=1.0 / math.sqrt(d),
                                 use_causal_mask=False)
    to.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride())).set_data_type(e4m3)
    for a in (tas, tao):
        a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    ws = torch.empty(g.get_workspace_size(), device=q.device, dtype=torch.uint8)
    pack = {tq: qf, tk: kf, tv: vf, tdq: sq_, tdk: sk_, tdv: sv_, tds: descale_s, tss: scale_s, tso: scale_o,
            to: o, tas: amax_s, tao: amax_o}

    def run():
        g.execute(pack, ws, handle=handle)

    def result():
        return (o.float() / scale_o).transpose(1, 2)
    return run, result


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
