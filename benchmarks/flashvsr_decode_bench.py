"""FlashVSR's decode side on one GPU: the TCDecoder per 8-frame chunk, the colour fix, and the CPU LQ prep.

Output sizes of issue 16 (768x1408 and 1280x704), random weights at the release widths
[512, 256, 128, 128] (latent 16 + LQ cond 768 channels), bf16. Per variant (ref: plain
formulation, eager; fused: sub-pixel upsample steps; fused_graphs: + CUDA graphs) the stream
decodes a first chunk (6 latents + 21 LQ frames) and then steady chunks (2 latents + 8 LQ
frames); the steady chunk is timed with CUDA events (median), and every variant's output is
compared with ref's (relative error). Also timed: AdaIN / wavelet colour fix of one chunk on
the GPU, and the CPU preparation of one chunk's LQ frames (PIL bicubic x4 / x2 + crop +
[-1, 1], what video.input does per 8 frames). ``golden`` replays the flashvsr_tcdecoder
golden in fp32 on CUDA (TF32 off) and prints the max error against it.

  python3 -m benchmarks.flashvsr_decode_bench            # on the GPU
  python3 -m benchmarks.flashvsr_decode_bench --dry      # tiny widths on the CPU: checks the script runs
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import median_ms
from nodes.flashvsr.color import color_correct
from nodes.flashvsr.tcdecoder import TCDecoder, TCDecoderConfig, build_tcdecoder
from nodes.taehv.stream import StreamingTAEHVDecoder
from nodes.video.prep import geometry, to_signed, upscale_crop

SIZES = {"768x1408": (768, 1408), "1280x704": (704, 1280)}     # name -> (H, W) of the output
VARIANTS = {"ref": dict(fused=False, graphs=False), "fused": dict(fused=True, graphs=False),
            "fused_graphs": dict(fused=True, graphs=True)}


def log(rec: dict) -> None:
    print(json.dumps(rec), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "flashvsr_decode.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")


def timed(fn, reps: int, warmup: int, cuda) -> float:
    return median_ms(fn, reps, warmup, cuda)


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def build(channels, device, dtype, seed=0) -> TCDecoder:
    with torch.device("meta"):
        model = TCDecoder(TCDecoderConfig(channels=tuple(channels)))
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, p[0].numel() ** -0.5, generator=g)
            else:
                p.normal_(0, 0.02, generator=g)
    return model.to(dtype).eval().requires_grad_(False)


def bench_decoder(model, size, h, w, device, dtype, reps, warmup, cuda):
    g = torch.Generator(device=device).manual_seed(1)
    lh, lw = h // 8, w // 8
    first_lat = torch.randn(1, 6, 16, lh, lw, generator=g, device=device).to(dtype)
    first_cond = (torch.rand(1, 21, 3, h, w, generator=g, device=device) * 2 - 1).to(dtype)
    lat = torch.randn(1, 2, 16, lh, lw, generator=g, device=device).to(dtype)
    cond = (torch.rand(1, 8, 3, h, w, generator=g, device=device) * 2 - 1).to(dtype)
    outs = {}
    for name, kw in VARIANTS.items():
        if kw["graphs"] and not cuda:
            continue
        dec = StreamingTAEHVDecoder(model, mode="exact", signed_output=True, **kw)
        state = dec.new_state()
        with torch.no_grad():
            y0 = dec.decode(state, model.decoder_input(first_lat, first_cond))
            y1 = dec.decode(state, model.decoder_input(lat, cond))
            outs[name] = (y0.float(), y1.float())
            steady = lambda: dec.decode(state, model.decoder_input(lat, cond))  # noqa: E731
            ms = timed(steady, reps, warmup, cuda)
            fix = {m: timed(lambda: color_correct(y1.float(), cond.float(), m), reps, warmup, cuda)
                   for m in ("adain", "wavelet")}
        rec = {"what": "decoder", "size": size, "variant": name, "dtype": str(dtype).split(".")[-1],
               "chunk_frames": int(y1.shape[1]), "first_chunk_frames": int(y0.shape[1]),
               "steady_ms_median": round(ms, 3), "ms_per_frame": round(ms / y1.shape[1], 3),
               "adain_ms": round(fix["adain"], 3), "wavelet_ms": round(fix["wavelet"], 3)}
        if name != "ref":
            rec["rel_err_vs_ref"] = max(rel_err(a, b) for a, b in zip(outs[name], outs["ref"]))
        if cuda:
            rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rec["graphs"] = dec.graph_status()
        log(rec)
        dec = state = None   # free the stream (and its graphs) before the next variant
        if cuda:
            torch.cuda.empty_cache()


def bench_prep(size, h, w, reps):
    try:
        import PIL  # noqa: F401
    except ImportError:
        log({"what": "lq_prep_cpu_skipped", "why": "Pillow is not installed on this machine"})
        return
    for scale in (4.0, 2.0):
        src_h, src_w = int(round(h / scale)), int(round(w / scale))
        geo = geometry(src_w, src_h, scale)
        frames = np.random.default_rng(0).integers(0, 256, (8, src_h, src_w, 3), dtype=np.uint8)
        ms = timed(lambda: to_signed(np.stack([upscale_crop(f, geo) for f in frames])), reps, 1, False)
        with ThreadPoolExecutor(8) as pool:     # PIL's resize releases the GIL: frames in parallel
            ms8 = timed(lambda: to_signed(np.stack(list(pool.map(lambda f: upscale_crop(f, geo), frames)))),
                        reps, 1, False)
        log({"what": "lq_prep_cpu", "size": size, "scale": scale, "src": f"{src_h}x{src_w}",
             "out": f"{geo.out_h}x{geo.out_w}", "ms_per_8_frames": round(ms, 2),
             "ms_per_8_frames_8_threads": round(ms8, 2), "cpus": os.cpu_count()})


def golden(device) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from goldens import case_json, tensors
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    case = "flashvsr_tcdecoder"
    cj = case_json(case)
    sd = tensors(case, cj["files"]["weights"])
    inp, out = tensors(case, cj["files"]["inputs"]), tensors(case, cj["files"]["outputs"])
    model = build_tcdecoder(sd, device=device)
    lat = inp["latents"].transpose(1, 2).to(device)
    lq = (inp["lq_video_u8"].float().permute(0, 3, 1, 2)[None] / 255.0 * 2.0 - 1.0).to(device)
    for fused in (False, True):
        dec = StreamingTAEHVDecoder(model, mode="exact", signed_output=True, fused=fused)
        state, errs = dec.new_state(), []
        for k, c in enumerate(cj["config"]["chunks"]):
            (a, b), (p, q) = c["latents"], c["lq_frames"]
            with torch.no_grad():
                y = dec.decode(state, model.decoder_input(lat[:, a:b], lq[:, p:q]))
                errs.append(float((y.cpu() - out[f"stream.{k}.frames"].transpose(1, 2)).abs().max()))
                ad = color_correct(y, lq[:, p:q], "adain").cpu()
                errs.append(float((ad - out[f"stream.{k}.adain"].transpose(1, 2)).abs().max()))
        log({"what": "golden_fp32", "device": str(device), "fused": fused, "max_abs_err": max(errs),
             "atol_frames": cj["tolerance"]["frames"]["atol"]})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry", action="store_true", help="tiny widths and sizes on the CPU")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sizes", default=",".join(SIZES))
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.dry
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        log({"what": "env", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__})
        torch.backends.cudnn.benchmark = True
    golden(device)
    channels, reps, warmup = ([512, 256, 128, 128], args.reps, 3) if cuda else ([16, 8, 8, 8], 2, 1)
    model = build(channels, device, dtype)
    for size in args.sizes.split(","):
        h, w = SIZES[size] if cuda else (128, 256)
        bench_decoder(model, size, h, w, device, dtype, reps, warmup, cuda)
        bench_prep(size, *SIZES[size], reps=3 if cuda else 1)


if __name__ == "__main__":
    main()
