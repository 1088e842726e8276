"""Can cuDNN run the Wan VAE decoder's 3x3x3 convs in FP8 on this GPU, and how fast?

For each conv shape of a steady W1 block (channels-last, bf16 baseline through F.conv3d with
cudnn.benchmark), the same conv as a cuDNN frontend graph with e4m3 input and weight,
float32 accumulation, a per-output-channel dequantisation multiply and a bf16 output. Every
execution plan cuDNN offers is built and timed (CUDA events, median); the best is reported
with its TFLOP/s and two errors: against the float32 conv of the same quantised values (the
kernel's own arithmetic) and against the bf16 conv of the unquantised input (what FP8 costs).

The input is drawn like the decoder's: silu(rms-normalised gaussian), quantised with the
static scale its bound gives (|silu(y)| <= |y| <= sqrt(C) max|gamma|, gamma = 1 here), so no
amax pass is needed at run time; the weight per output channel by its amax.

  python3 -m benchmarks.fp8_conv_probe            # on the GPU; prints one JSON line per row, a table last
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from benchmarks.common import env, events_ms, log, rel_err

E4M3 = torch.float8_e4m3fn

# (cin, cout, frames in incl. 2 of history, h, w) of the steady block's 3x3x3 convs; then padded variants
SHAPES = ((384, 384, 5, 60, 104), (384, 384, 8, 120, 208), (192, 192, 14, 240, 416), (96, 96, 14, 480, 832),
          (96, 128, 14, 480, 832), (128, 128, 14, 480, 832))


def _cl(x):
    return x.contiguous(memory_format=torch.channels_last_3d)


def _graph(cudnn, handle, x8, w8, scale, y):
    f32, e4m3 = cudnn.data_type.FLOAT, cudnn.data_type.FP8_E4M3
    g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    tx = g.tensor(dim=list(x8.shape), stride=list(x8.stride()), data_type=e4m3)
    tw = g.tensor(dim=list(w8.shape), stride=list(w8.stride()), data_type=e4m3)
    ts = g.tensor(dim=list(scale.shape), stride=list(scale.stride()), data_type=f32)
    c = g.conv_fprop(image=tx, weight=tw, pre_padding=[0, 1, 1], post_padding=[0, 1, 1], stride=[1, 1, 1],
                     dilation=[1, 1, 1], compute_data_type=f32)
    c.set_data_type(f32)
    ty = g.mul(a=c, b=ts, compute_data_type=f32)
    ty.set_output(True).set_dim(list(y.shape)).set_stride(list(y.stride())).set_data_type(cudnn.data_type.BFLOAT16)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans(cudnn.build_plan_policy.ALL)
    return g, {tx: x8, tw: w8, ts: scale, ty: y}


def probe_shape(cudnn, handle, cin, cout, t, h, w):
    to = t - 2
    flops = 2 * cout * cin * 27 * to * h * w
    gen = torch.Generator(device="cuda").manual_seed(cin * 7 + cout)
    y = torch.randn(1, cin, t, h, w, device="cuda", generator=gen)
    y = y * torch.rsqrt(y.square().mean(1, keepdim=True))
    x = _cl(F.silu(y).to(torch.bfloat16))
    wt = _cl((torch.randn(cout, cin, 3, 3, 3, device="cuda", generator=gen) / math.sqrt(cin * 27)).to(torch.bfloat16))
    sx = math.sqrt(cin) / 448.0                                        # static bound scale
    sw = wt.float().abs().amax((1, 2, 3, 4), keepdim=True) / 448.0     # [cout,1,1,1,1]
    x8 = _cl((x.float() / sx).clamp(-448, 448).to(E4M3))
    w8 = _cl((wt.float() / sw).clamp(-448, 448).to(E4M3))
    scale = (sw.reshape(1, cout, 1, 1, 1) * sx).float().contiguous()
    rec = {"shape": [cin, cout, t, h, w], "tflop": round(flops / 1e12, 3)}
    with torch.backends.cudnn.flags(benchmark=True):
        ms_bf16, _ = events_ms(lambda: F.conv3d(x, wt, None, padding=(0, 1, 1)), reps=20, warmup=3)
        ref_bf16 = F.conv3d(x, wt, None, padding=(0, 1, 1)).float()
    rec.update(bf16_ms=round(ms_bf16, 3), bf16_tflops=round(flops / ms_bf16 / 1e9))
    ref_q = F.conv3d(x8.float() * sx, (w8.float() * sw), None, padding=(0, 1, 1))
    out = _cl(torch.empty(1, cout, to, h, w, device="cuda", dtype=torch.bfloat16))
    try:
        g, pack = _graph(cudnn, handle, x8, w8, scale, out)
    except Exception as e:  # noqa: BLE001 - a probe reports every failure and goes on
        rec["fp8"] = f"unsupported: {type(e).__name__}: {str(e)[:300]}"
        log(rec, "fp8_conv_probe.jsonl")
        return rec
    ws = torch.empty(max(g.get_workspace_size(), 1), device="cuda", dtype=torch.uint8)
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    plans = []
    for i in range(g.get_execution_plan_count()):
        try:
            need = g.get_workspace_size_plan_at_index(i)
            wsi = ws if need <= ws.numel() else torch.empty(need, device="cuda", dtype=torch.uint8)
            ms, _ = events_ms(lambda: g.execute_plan_at_index(pack, wsi, i, handle=handle), reps=10, warmup=2)
            plans.append((ms, i))
        except Exception as e:  # noqa: BLE001
            plans.append((float("inf"), f"{i}: {type(e).__name__}: {str(e)[:80]}"))
    good = sorted(p for p in plans if p[0] != float("inf"))
    rec["plans"] = len(plans)
    if not good:
        rec["fp8"] = f"no plan ran: {[p[1] for p in plans][:3]}"
        log(rec, "fp8_conv_probe.jsonl")
        return rec
    best_ms, best = good[0]
    need = g.get_workspace_size_plan_at_index(best)
    wsb = ws if need <= ws.numel() else torch.empty(need, device="cuda", dtype=torch.uint8)
    ms, _ = events_ms(lambda: g.execute_plan_at_index(pack, wsb, best, handle=handle), reps=20, warmup=3)
    # graph capture of the chosen plan (the decoder replays CUDA graphs)
    try:
        cg = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            cudnn.set_stream(handle=handle, stream=s.cuda_stream)
            g.execute_plan_at_index(pack, wsb, best, handle=handle)
            with torch.cuda.graph(cg, stream=s):
                g.execute_plan_at_index(pack, wsb, best, handle=handle)
        torch.cuda.current_stream().wait_stream(s)
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        out.zero_()
        cg.replay()
        torch.cuda.synchronize()
        rec["graph_capture"] = "ok"
    except Exception as e:  # noqa: BLE001
        rec["graph_capture"] = f"{type(e).__name__}: {str(e)[:120]}"
        g.execute_plan_at_index(pack, wsb, best, handle=handle)
    torch.cuda.synchronize()
    rec.update(fp8_ms=round(ms, 3), fp8_tflops=round(flops / ms / 1e9), speedup=round(ms_bf16 / ms, 2),
               best_plan=f"{best}: {g.get_plan_name_at_index(best)}", plan_ms=[round(p[0], 3) for p in good[:6]],
               err_vs_quantised_fp32=f"{rel_err(out.float(), ref_q):.2e}",
               err_vs_bf16=f"{rel_err(out.float(), ref_bf16):.2e}",
               bf16_vs_fp32=f"{rel_err(ref_bf16, F.conv3d(x.float(), wt.float(), None, padding=(0, 1, 1))):.2e}")
    log(rec, "fp8_conv_probe.jsonl")
    return rec


def main():
    import cudnn
    log({"env": env(), "cudnn_frontend": cudnn.__version__, "cudnn_backend": cudnn.backend_version()},
        "fp8_conv_probe.jsonl")
    handle = cudnn.create_handle()
    rows = []
    for shape in SHAPES:
        try:
            rows.append(probe_shape(cudnn, handle, *shape))
        except Exception as e:  # noqa: BLE001
            rows.append({"shape": list(shape), "fp8": f"error {type(e).__name__}: {str(e)[:200]}"})
            log(rows[-1], "fp8_conv_probe.jsonl")
        torch.cuda.empty_cache()
    print(f"{'shape':26} {'bf16 ms':>8} {'TF/s':>5} {'fp8 ms':>8} {'TF/s':>5} {'x':>5} {'err q':>9} {'err bf16':>9} graph")
    for r in rows:
        if "fp8_ms" in r:
            print(f"{str(r['shape']):26} {r['bf16_ms']:8.3f} {r['bf16_tflops']:5} {r['fp8_ms']:8.3f} "
                  f"{r['fp8_tflops']:5} {r['speedup']:5} {r['err_vs_quantised_fp32']:>9} {r['err_vs_bf16']:>9} "
                  f"{r['graph_capture'][:10]}")
        else:
            print(f"{str(r['shape']):26} {r.get('bf16_ms', '-')!s:>8} {r.get('fp8', '')[:120]}")


if __name__ == "__main__":
    main()
