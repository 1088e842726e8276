"""Op-level FP8 vs bf16 at the W1 and Wan-14B shapes: attention (cuDNN sdpa_fp8 per scaling option and output
type, vs cuDNN bf16 SDPA) and the DiT linears (torch._scaled_mm row-wise / tensor-wise vs bf16). One JSON line
per (op, shape, method): ms (CUDA events, median), TFLOP/s, relative error vs float32. Attention also records
the kernel alone vs with the Q/K/V quantisation (eager and torch.compile'd) and whether the call captures
into a CUDA graph and replays to the same output.

    python3 -m benchmarks.fp8_ops --out fp8_ops.jsonl          # GPU
    python3 -m benchmarks.fp8_ops --dry                         # CPU, tiny shapes: the same code paths
"""
from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F

from nodes.common.attention import attention
from nodes.common.fp8 import amax_scale, quantize, quantize_rows
from nodes.common.fp8_attention import (CudnnFp8Attention, QuantizedQKV, emulate_sdpa_fp8, quantize_qkv,
                                        quantized_qkv, requantize_qkv)

ATTN_SHAPES = [("w1_block0", 12, 4680, 4680), ("w1_block5", 12, 4680, 28080), ("w1_steady", 12, 4680, 32760), ("wan14b_block5", 40, 4680, 28080)]
LINEAR_SHAPES = [("w1_qkvo", 4680, 1536, 1536), ("w1_ffn_up", 4680, 1536, 8960), ("w1_ffn_down", 4680, 8960, 1536),
                 ("14b_qkvo", 4680, 5120, 5120), ("14b_ffn_up", 4680, 5120, 13824),
                 ("14b_ffn_down", 4680, 13824, 5120)]
DRY_ATTN = [("dry", 2, 48, 80)]
DRY_LINEAR = [("dry", 48, 64, 96)]


def timed(fn, n: int, cuda: bool) -> float:
    for _ in range(3):
        fn()
    if not cuda:
        return float("nan")
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def emit(out, **row):
    line = json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})
    print(line, flush=True)
    if out:
        out.write(line + "\n")


def fp32_reference(q, k, v, chunk: int = 4):
    """Exact attention in float32, a few heads at a time (memory-efficient kernel on CUDA, math on CPU)."""
    outs = []
    for h in range(0, q.shape[2], chunk):
        sl = slice(h, h + chunk)
        qt, kt, vt = (x[:, :, sl].float().transpose(1, 2) for x in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2))
    return torch.cat(outs, dim=2)


def bench_attention(out, shapes, dev, n):
    cuda = dev.type == "cuda"
    quant_c = torch.compile(quantize_qkv, dynamic=False, fullgraph=True) if cuda else quantize_qkv
    for name, h, lq, lkv in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, L, h, 128 if cuda else 16, device=dev, dtype=torch.bfloat16, generator=g)
                   for L in (lq, lkv, lkv))
        ref = fp32_reference(q, k, v)
        flops = 4 * h * lq * lkv * q.shape[-1]
        base = attention(q, k, v, "cudnn" if cuda else "math")
        ms = timed(lambda: attention(q, k, v, "cudnn" if cuda else "math"), n, cuda)
        emit(out, op="attention", shape=name, heads=h, lq=lq, lkv=lkv, method="bf16_cudnn", ms=ms,
             tflops=flops / ms / 1e9, rel_err_vs_fp32=rel(base, ref))
        for scaling in ("tensor", "head"):
            for o in ("fp8", "bf16"):
                method = f"fp8_{scaling}_out{o}"
                try:
                    qq = quantized_qkv(q, k, v, scaling)
                    a = 1 / math.sqrt(q.shape[-1])
                    if cuda:
                        runner = CudnnFp8Attention(o)
                        y = runner(qq, a)
                        kernel_ms = timed(lambda: runner(qq, a), n, cuda)
                        e2e = lambda: runner(quantized_qkv(q, k, v, scaling), a)  # noqa: E731
                        e2e_c = lambda: runner(quantized_qkv(q, k, v, scaling, quant_c), a)  # noqa: E731
                        e2e_ms, e2e_c_ms = timed(e2e, n, cuda), timed(e2e_c, n, cuda)
                        graph_ok = _graph_replays(lambda: e2e_c().clone(), (q, k, v))
                    else:
                        y = emulate_sdpa_fp8(qq, a, o)
                        kernel_ms = e2e_ms = e2e_c_ms = float("nan")
                        graph_ok = None
                    emu = emulate_sdpa_fp8(qq, a, o) if lq * lkv * h <= 12 * 4680 * 4680 or not cuda else None
                    emit(out, op="attention", shape=name, heads=h, lq=lq, lkv=lkv, method=method, ms=kernel_ms,
                         tflops=flops / kernel_ms / 1e9, ms_with_quant=e2e_ms, ms_with_compiled_quant=e2e_c_ms,
                         rel_err_vs_fp32=rel(y, ref), rel_err_vs_bf16=rel(y, base),
                         rel_err_vs_emulation=None if emu is None else rel(y, emu), graph_replay_ok=graph_ok)
                except Exception as e:  # noqa: BLE001 - an unsupported option is a result, not a crash
                    emit(out, op="attention", shape=name, method=method, error=repr(e)[:300])
        bench_from_cache(out, name, h, lq, lkv, q, k, v, ref, flops, cuda, n)
        del q, k, v, ref, base
        if cuda:
            torch.cuda.empty_cache()


def bench_from_cache(out, name, h, lq, lkv, q, k, v, ref, flops, cuda, n):
    """K/V as an FP8 KV cache holds them (e4m3, a scale per token and head) fed to FP8 attention: the rescale
    (requantize_qkv, compiled) plus the kernel, vs dequantising to bf16 and quantising again."""
    (k8, ks), (v8, vs) = quantize_rows(k), quantize_rows(v)
    req_c = torch.compile(requantize_qkv, dynamic=False, fullgraph=True) if cuda else requantize_qkv
    a = 1 / math.sqrt(q.shape[-1])
    for scaling in ("tensor", "head"):
        method = f"fp8_{scaling}_from_fp8_cache"
        try:
            if not cuda:
                y = emulate_sdpa_fp8(QuantizedQKV(*requantize_qkv(q, k8, ks, v8, vs, scaling)), a)
                emit(out, op="attention", shape=name, heads=h, lq=lq, lkv=lkv, method=method,
                     rel_err_vs_fp32=rel(y, ref))
                continue
            runner = CudnnFp8Attention("fp8")
            fn = lambda: runner(QuantizedQKV(*req_c(q, k8, ks, v8, vs, scaling)), a)  # noqa: E731
            y = fn()
            ms = timed(fn, n, cuda)
            emit(out, op="attention", shape=name, heads=h, lq=lq, lkv=lkv, method=method, ms=ms,
                 tflops=flops / ms / 1e9, rel_err_vs_fp32=rel(y, ref))
        except Exception as e:  # noqa: BLE001
            emit(out, op="attention", shape=name, method=method, error=repr(e)[:300])


def _graph_replays(fn, inputs) -> bool:
    """Capture fn into a CUDA graph, change the inputs in place, replay: same as eager on the new inputs?
    The inputs are put back afterwards: the rows after this one compare against a reference made from them
    (before 2026-12-06 they were left halved, so every later row's error was against a stale reference)."""
    saved = [x.clone() for x in inputs]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fn()
    for x in inputs:
        x.mul_(0.5)
    graph.replay()
    eager = fn()
    torch.cuda.synchronize()
    same = bool(torch.equal(y, eager))
    for x, x0 in zip(inputs, saved):
        x.copy_(x0)
    return same


def bench_linears(out, shapes, dev, n):
    cuda = dev.type == "cuda"
    quant_c = torch.compile(quantize_rows, dynamic=False, fullgraph=True) if cuda else quantize_rows
    for name, m, k, nout in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
        w = torch.randn(nout, k, device=dev, dtype=torch.bfloat16, generator=g) / k ** 0.5
        ref = x.float() @ w.float().T
        flops = 2 * m * k * nout
        y = F.linear(x, w)
        ms = timed(lambda: F.linear(x, w), n, cuda)
        emit(out, op="linear", shape=name, m=m, k=k, n=nout, method="bf16", ms=ms, tflops=flops / ms / 1e9,
             rel_err_vs_fp32=rel(y, ref))
        w8, ws = quantize_rows(w)
        ws = ws.reshape(1, -1)
        x8, xs = quantize_rows(x)
        for method, fn in (
                ("fp8_rowwise", lambda: torch._scaled_mm(x8, w8.t(), xs, ws, out_dtype=torch.bfloat16)),
                ("fp8_rowwise_fast_accum", lambda: torch._scaled_mm(x8, w8.t(), xs, ws, out_dtype=torch.bfloat16,
                                                                    use_fast_accum=True)),
                ("fp8_rowwise_with_quant", _rowwise_with(quantize_rows, x, w8, ws)),
                ("fp8_rowwise_with_compiled_quant", _rowwise_with(quant_c, x, w8, ws)),
                ("fp8_tensorwise", _tensorwise(x, w))):
            try:
                y = fn()
                ms = timed(fn, n, cuda)
                emit(out, op="linear", shape=name, m=m, k=k, n=nout, method=method, ms=ms, tflops=flops / ms / 1e9,
                     rel_err_vs_fp32=rel(y, ref))
            except Exception as e:  # noqa: BLE001
                emit(out, op="linear", shape=name, method=method, error=repr(e)[:300])
        if cuda:
            torch.cuda.empty_cache()


def _rowwise_with(quant, x, w8, ws):
    """The FP8 linear as the model runs it: quantise the activation per token, then the row-wise mm."""
    def fn():
        x8, sx = quant(x)
        return torch._scaled_mm(x8, w8.t(), sx, ws, out_dtype=torch.bfloat16)
    return fn


def _tensorwise(x, w):
    sx, sw = amax_scale(x), amax_scale(w)
    x8, w8 = quantize(x, sx), quantize(w, sw)
    return lambda: torch._scaled_mm(x8, w8.t(), sx, sw, out_dtype=torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes: check the script, time nothing")
    ap.add_argument("--out", default=None)
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device("cpu" if args.dry else "cuda")
    out = open(args.out, "w") if args.out else None
    bench_attention(out, DRY_ATTN if args.dry else ATTN_SHAPES, dev, args.n)
    bench_linears(out, DRY_LINEAR if args.dry else LINEAR_SHAPES, dev, args.n)


if __name__ == "__main__":
    main()
