"""The Wan VAE decoder's 3x3x3 convs as cuDNN frontend graphs: bf16 and FP8, with and without a fused epilogue.

For each conv shape of a steady W1 block (channels-last): torch's F.conv3d (cudnn.benchmark) alone and
followed by the bias + residual adds the decoder does after a block's second conv; then the same conv as
a cuDNN graph with bf16 or e4m3 input and weight (float32 accumulation; FP8 with a per-output-channel
dequantisation multiply), bf16 out, alone and with the bias + residual adds fused as pointwise ops. Every
plan cuDNN offers is built and timed (CUDA events, median); the fastest is reported with its error
against the float32 conv of the unquantised input.

The input is drawn like the decoder's: silu(rms-normalised gaussian); FP8 quantises it with the static
scale its bound gives (|silu(y)| <= |y| <= sqrt(C) max|gamma|, gamma = 1 here: no amax pass at run
time), the weight per output channel by its amax. First measured 2026-12-06 on an H100: FP8 ran only
1.05-1.10x bf16 at 96 and 384 channels and no faster at 192 (BENCHMARKS.md).

  python3 -m benchmarks.fp8_conv_probe            # on the GPU; one JSON line per shape, a table last
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from benchmarks.common import env, events_ms, log, rel_err

E4M3 = torch.float8_e4m3fn

# (cin, cout, frames in incl. 2 of history, h, w) of the steady block's 3x3x3 convs
SHAPES = ((384, 384, 5, 60, 104), (384, 384, 8, 120, 208), (192, 192, 14, 240, 416), (96, 96, 14, 480, 832))
# name -> (input dtype, fused epilogue: bias + residual add)
VARIANTS = {"graph_bf16": ("bf16", False), "graph_bf16_res": ("bf16", True),
            "graph_fp8": ("fp8", False), "graph_fp8_res": ("fp8", True)}


def _cl(x):
    return x.contiguous(memory_format=torch.channels_last_3d)


def _graph(cudnn, handle, x, w, y, scale=None, bias=None, res=None):
    """conv(x, w) [* scale] [+ bias + res] -> y (bf16) as one cuDNN graph; every plan built."""
    f32 = cudnn.data_type.FLOAT
    io = cudnn.data_type.FP8_E4M3 if x.dtype == E4M3 else cudnn.data_type.BFLOAT16
    g = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=handle)

    def t(v, dt):
        return g.tensor(dim=list(v.shape), stride=list(v.stride()), data_type=dt)
    pack = {}
    tx, tw = t(x, io), t(w, io)
    pack.update({tx: x, tw: w})
    c = g.conv_fprop(image=tx, weight=tw, pre_padding=[0, 1, 1], post_padding=[0, 1, 1], stride=[1, 1, 1],
                     dilation=[1, 1, 1], compute_data_type=f32)
    c.set_data_type(f32)
    for v, dt in ((scale, f32), (bias, f32), (res, cudnn.data_type.BFLOAT16)):
        if v is None:
            continue
        tv = t(v, dt)
        pack[tv] = v
        c = g.mul(a=c, b=tv, compute_data_type=f32) if v is scale else g.add(a=c, b=tv, compute_data_type=f32)
        c.set_data_type(f32)
    c.set_output(True).set_dim(list(y.shape)).set_stride(list(y.stride())).set_data_type(cudnn.data_type.BFLOAT16)
    pack[c] = y
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans(cudnn.build_plan_policy.ALL)
    return g, pack


def _best_plan(cudnn, handle, g, pack):
    """(ms of the fastest plan, its index and name, ms of the next few) timed with CUDA events."""
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    times = []
    for i in range(g.get_execution_plan_count()):
        try:
            ws = torch.empty(max(g.get_workspace_size_plan_at_index(i), 1), device="cuda", dtype=torch.uint8)
            ms, _ = events_ms(lambda: g.execute_plan_at_index(pack, ws, i, handle=handle), reps=8, warmup=2)
            times.append((ms, i))
        except Exception:  # noqa: BLE001 - a plan that does not run is skipped
            continue
    if not times:
        raise RuntimeError(f"none of {g.get_execution_plan_count()} plans ran")
    times.sort()
    best = times[0][1]
    ws = torch.empty(max(g.get_workspace_size_plan_at_index(best), 1), device="cuda", dtype=torch.uint8)
    ms, _ = events_ms(lambda: g.execute_plan_at_index(pack, ws, best, handle=handle), reps=20, warmup=3)
    return ms, f"{best}: {g.get_plan_name_at_index(best)}", [round(t[0], 3) for t in times[:5]]


def probe_shape(cudnn, handle, cin, cout, t, h, w, torch_only=False):
    to = t - 2
    flops = 2 * cout * cin * 27 * to * h * w
    gen = torch.Generator(device="cuda").manual_seed(cin * 7 + cout)
    y = torch.randn(1, cin, t, h, w, device="cuda", generator=gen)
    y = y * torch.rsqrt(y.square().mean(1, keepdim=True))
    x = _cl(F.silu(y).to(torch.bfloat16))
    del y
    wt = _cl((torch.randn(cout, cin, 3, 3, 3, device="cuda", generator=gen) / math.sqrt(cin * 27)).to(torch.bfloat16))
    bias = (torch.randn(1, cout, 1, 1, 1, device="cuda", generator=gen) * 0.02).contiguous()
    res = _cl(torch.randn(1, cout, to, h, w, device="cuda", generator=gen).to(torch.bfloat16))
    sx = math.sqrt(cin) / 448.0                                        # static bound scale
    sw = wt.float().abs().amax((1, 2, 3, 4), keepdim=True) / 448.0     # [cout,1,1,1,1]
    x8 = _cl((x.float() / sx).clamp(-448, 448).to(E4M3))
    w8 = _cl((wt.float() / sw).clamp(-448, 448).to(E4M3))
    scale = (sw.reshape(1, cout, 1, 1, 1) * sx).float().contiguous()
    rec = {"shape": [cin, cout, t, h, w], "tflop": round(flops / 1e12, 3)}
    torch.backends.cudnn.benchmark = True
    conv = lambda: F.conv3d(x, wt, None, padding=(0, 1, 1))  # noqa: E731
    ms, _ = events_ms(conv, reps=20, warmup=3)
    ms_res, _ = events_ms(lambda: conv().add_(bias).add_(res), reps=20, warmup=3)
    rec["torch_bf16"] = {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9)}
    rec["torch_bf16_res"] = {"ms": round(ms_res, 3)}
    ref = F.conv3d(x.float(), wt.float(), None, padding=(0, 1, 1))
    for name, (dt, fused) in ({} if torch_only else VARIANTS).items():
        out = _cl(torch.empty(1, cout, to, h, w, device="cuda", dtype=torch.bfloat16))
        args = (x8, w8) if dt == "fp8" else (x, wt)
        kw = {"scale": scale if dt == "fp8" else None, "bias": bias if fused else None, "res": res if fused else None}
        try:
            g, pack = _graph(cudnn, handle, *args, out, **kw)
            ms_v, plan, others = _best_plan(cudnn, handle, g, pack)
        except Exception as e:  # noqa: BLE001 - a probe reports every failure and goes on
            rec[name] = f"unsupported: {type(e).__name__}: {str(e)[:200]}"
            continue
        want = ref + bias + res.float() if fused else ref
        rec[name] = {"ms": round(ms_v, 3), "tflops": round(flops / ms_v / 1e9), "plan": plan, "next": others,
                     "err_vs_fp32": f"{rel_err(out.float() - (want - ref), ref):.2e}"}
        del g, pack, out
    log(rec, "fp8_conv_probe.jsonl")
    return rec


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--benchmark-limit", type=int, default=None,
                    help="torch.backends.cudnn.benchmark_limit for torch's conv (0: try every plan; torch's default 10)")
    ap.add_argument("--torch-only", action="store_true", help="only torch's conv (e.g. to compare benchmark limits)")
    ap.add_argument("--channels", default="", help="only shapes with these input channels, comma-separated")
    args = ap.parse_args()
    if args.benchmark_limit is not None:
        torch.backends.cudnn.benchmark_limit = args.benchmark_limit
    import cudnn
    log({"env": env(), "cudnn_frontend": cudnn.__version__, "cudnn_backend": cudnn.backend_version(),
         "benchmark_limit": torch.backends.cudnn.benchmark_limit},
        "fp8_conv_probe.jsonl")
    handle = cudnn.create_handle()
    rows = []
    keep = {int(c) for c in args.channels.split(",") if c}
    for shape in SHAPES:
        if keep and shape[0] not in keep:
            continue
        try:
            rows.append(probe_shape(cudnn, handle, *shape, torch_only=args.torch_only))
        except Exception as e:  # noqa: BLE001
            rows.append({"shape": list(shape), "fp8": f"error {type(e).__name__}: {str(e)[:200]}"})
            log(rows[-1], "fp8_conv_probe.jsonl")
        torch.cuda.empty_cache()
    names = ["torch_bf16", "torch_bf16_res", *([] if args.torch_only else VARIANTS)]
    print(f"{'shape':24} " + " ".join(f"{n:>15}" for n in names) + "   (ms; err of the graph variants vs fp32)")
    for r in rows:
        cells = []
        for n in names:
            v = r.get(n)
            cells.append(f"{v['ms']:9.3f} {v.get('err_vs_fp32', '')[:5]:>5}" if isinstance(v, dict) else f"{str(v)[:15]:>15}")
        print(f"{str(r['shape']):24} " + " ".join(cells))


if __name__ == "__main__":
    main()
