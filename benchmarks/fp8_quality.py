"""What each fast-mode choice costs in quality, on the W1 shapes (Self-Forcing 1.3B, 480x832, 3 frames per
block, 4 steps, window 21 frames) with RANDOM weights (no checkpoint on the device machine: the numbers say
how far each option moves the computation, not how a trained model's video looks).

For each option alone and all together, against the bf16 model (same weights, same noise, same re-noise draws):
- teacher-forced: the bf16 rollout's calls (inputs, timesteps, context passes) replayed in order through the
  option's stream; relative error of the flow at block 5 (and block 0) vs the bf16 flow;
- free-running: 10 blocks from the same noise, each block's latents decoded by one random TAEHV; PSNR of the
  decoded frames vs the bf16 rollout's, per block, and the latents' relative error.

The options are applied with the module calls the wan.dit node's finish() makes (use_fp8_linears,
use_fp8_attention, WanDenoiser(kv_dtype, context_pass, kv_scaling)), on copies of one loaded model; eager (no graphs,
no compile) - the same numerics as the captured path.

    python3 -m benchmarks.fp8_quality --out fp8_quality.jsonl       # GPU, full size
    python3 -m benchmarks.fp8_quality --dry                          # CPU, tiny model: the same code paths
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

from nodes.ar.rollout import ARRollout
from nodes.ar.schedule import ARSchedule
from nodes.common.causal import StreamSpec
from nodes.samplers.flow_match import FlowMatchTable
from nodes.wan.causal import WanDenoiser

# name: (fp8 linears, fp8 attention scaling or None, fp8 KV cache, context pass)
OPTIONS = {
    "bf16": (False, None, False, "full"),
    "fp8_linears": (True, None, False, "full"),
    "fp8_attn_tensor": (False, "tensor", False, "full"),
    "fp8_attn_head": (False, "head", False, "full"),
    "fp8_kv": (False, None, True, "full"),
    "ctx_reuse": (False, None, False, "reuse"),
    "fp8_all": (True, "tensor", True, "full"),
    "fast_all": (True, "tensor", True, "reuse"),
}
STEPS, SHIFT, NFPB = [1000, 750, 500, 250], 5.0, 3


def build(dry: bool, dev: str):
    from nodes.taehv.node import TAEHVDecodeNode
    from nodes.wan.node_dit import WanDiTNode
    if dry:
        dit_p = dict(weights="random", dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, text_len=32,
                     dtype="fp32", compile="off")
        dec_p = dict(checkpoint="random", dtype="fp32", channels=[32, 16, 16, 16], graphs=False)
        lat = (16, 8, 12)
    else:
        dit_p = dict(weights="random", preset="1.3b", dtype="bf16", compile="off")
        dec_p = dict(checkpoint="random", dtype="bf16", graphs=False)
        lat = (16, 60, 104)
    dit = WanDiTNode("dit", dit_p, dev)
    dit.load()
    dec = TAEHVDecodeNode("decoder", dec_p, dev)
    dec.load()
    return dit, dec, lat


def make_stream(dit, option, lat, text, runners):
    linears, attn, kv, ctx = OPTIONS[option]
    m = copy.deepcopy(dit.model)
    if linears:
        m.use_fp8_linears()
    if attn:
        runner = None
        if m.patch_embedding.weight.is_cuda:
            from nodes.common.fp8_attention import CudnnFp8Attention
            runner = runners.setdefault("fp8", CudnnFp8Attention("fp8"))
        m.use_fp8_attention(attn, "fp8", runner)
    # as the node does: an FP8 cache read by FP8 attention with tensor scales keeps one running scale per layer
    kv_scaling = "tensor" if kv and attn == "tensor" else "row"
    den = WanDenoiser(m, m.cfg, dit.dtype, "auto", torch.float8_e4m3fn if kv else None, ctx, kv_scaling)
    stream = den.open_stream(StreamSpec(frame_shape=lat, frames_per_block=NFPB, window_frames=21, graphs=False))
    stream.set_conditions(text)
    return stream


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


PSNR_SAME = 99.0   # reported for identical frames (PSNR is infinite there)


def psnr(a, b) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return PSNR_SAME if mse == 0 else min(PSNR_SAME, 10 * math.log10(4.0 / mse))   # frames in [-1, 1]: range 2


def rollout(stream, noise, blocks, dev, trace=None):
    r = ARRollout(stream, ARSchedule.build(FlowMatchTable(SHIFT), STEPS, warp=True), NFPB, noise,
                  generator=torch.Generator(device=dev).manual_seed(1), trace=trace)
    with torch.no_grad():
        return [r.step() for _ in range(blocks)]


def decode(dec, latents):
    st = dec.stream.new_state()
    with torch.no_grad():
        return [dec.stream.decode(st, x).float().clamp(-1, 1) for x in latents]


def teacher_forced(stream, calls, blocks=(0, 5)) -> dict:
    """Replay the bf16 rollout's calls in order; flow errors of the denoising calls of ``blocks``."""
    errs: dict[int, list[float]] = {b: [] for b in blocks}
    with torch.no_grad():
        for c in calls:
            t = float(c.t.flatten()[0])
            if c.kind == "denoise":
                flow = stream.denoise(c.x, t, c.frame_start)
                if c.block in errs:
                    errs[c.block].append(rel(flow, c.flow))
            else:
                stream.commit(c.x, t, c.frame_start)
    return {f"tf_rel_err_block{b}": sum(v) / len(v) for b, v in errs.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--options", default=",".join(OPTIONS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = "cpu" if args.dry else "cuda"
    t0 = time.perf_counter()
    dit, dec, lat = build(args.dry, dev)
    cfg = dit.model.cfg
    g = torch.Generator(device=dev).manual_seed(0)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g, device=dev)
    noise = torch.randn((1, args.blocks * NFPB) + lat, generator=g, device=dev)
    out = open(args.out, "w") if args.out else None
    runners: dict = {}
    calls = []
    tf_block = min(5, args.blocks - 1)
    ref_stream = make_stream(dit, "bf16", lat, text, runners)
    ref_lat = rollout(ref_stream, noise, args.blocks, dev,
                      trace=lambda c: calls.append(c) if c.block is not None and c.block <= tf_block else None)
    ref_px = decode(dec, ref_lat)
    del ref_stream
    print(f"# reference rollout + decode: {time.perf_counter() - t0:.1f} s", flush=True)
    for option in args.options.split(","):
        t1 = time.perf_counter()
        row = {"option": option, "weights": "random", "blocks": args.blocks}
        row.update(teacher_forced(make_stream(dit, option, lat, text, runners), calls, (0, tf_block)))
        lats = rollout(make_stream(dit, option, lat, text, runners), noise, args.blocks, dev)
        px = decode(dec, lats)
        row["psnr_db"] = [round(psnr(a, b), 2) for a, b in zip(px, ref_px)]
        row["psnr_mean_db"] = round(sum(row["psnr_db"]) / len(px), 2)
        row["latent_rel_err"] = [round(rel(a, b), 5) for a, b in zip(lats, ref_lat)]
        row["s"] = round(time.perf_counter() - t1, 1)
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
        if dev == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
