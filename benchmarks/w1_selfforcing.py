"""W1: Self-Forcing Wan2.1-T2V-1.3B per AR block on one GPU, random weights, bf16.

480x832, 3 latent frames per block, 4 denoising steps (1000/750/500/250 warped at
shift 5) + one KV context pass at t=0, then the block's decode by TAEHV and by the
Wan VAE (Self-Forcing demo streaming decoder), each timed alone. The loop is our
own: WanDiT + SelfKVCache + CausalDenoiser driven by nodes.ar.ARRollout, i.e. the
model-level APIs the ar.sampler node wraps.

Variants (--variants, comma-separated):
  eager    no graphs, no compile
  graphs   CUDA graphs (engine.capture) for the DiT, the Wan VAE stream and TAEHV
  compile  graphs + torch.compile of the DiT's elementwise stages + every DiT graph captured
           before block 0 (CausalDenoiser.prepare). (The 2026-11-24 run also put TAEHV in
           channels-last memory here: 22.9 ms vs 14.0 NCHW, so that was dropped.)
Prints one JSON line per block, a summary per variant and a table last. The first
variant's latents are the reference the others are compared against (rel. error).

  python -m benchmarks.w1_selfforcing --variants eager,graphs,compile --blocks 10
"""
from __future__ import annotations

import argparse
import gc
import time
from statistics import median

import torch

from benchmarks.common import LATENT_HW, build_dit, env, log, random_init_, rel_err
from engine.capture import GraphCache
from nodes.ar.rollout import ARRollout
from nodes.ar.schedule import ARSchedule
from nodes.samplers.flow_match import FlowMatchTable
from nodes.taehv.model import TAEHV, TAEHVConfig
from nodes.wan.causal import CausalDenoiser
from nodes.common.kv_cache import SelfKVCache
from nodes.wan.vae import WanVAE
from nodes.wan.vae_stream import StreamingDecoder

FPB = 3


class TaehvStream:
    """Exact-mode TAEHV block decode with its MemBlock memory as graph inputs/outputs."""

    def __init__(self, model: TAEHV, graphs: bool):
        self.model, self.memory, self.keys = model, None, None
        self.graphs = GraphCache(self._fn, "cuda", enabled=graphs, name="taehv")

    def _fn(self, x, *mem):
        y, new = self.model.decode_chunk(x, dict(zip(self.keys, mem)))
        return (y, *[new[k] for k in self.keys])

    def __call__(self, x):
        if self.memory is None:
            y, self.memory = self.model.decode_chunk(x, None)
            self.keys = sorted(self.memory)
            return y[:, self.model.frames_to_trim:]
        y, *mem = self.graphs(tuple(x.shape), x, *[self.memory[k] for k in self.keys])
        self.memory = dict(zip(self.keys, mem))
        return y


def build_decoders(seed=1):
    with torch.device("meta"):
        vae = WanVAE()
    vae = random_init_(vae.to_empty(device="cuda"), seed)
    vae.set_latent_stats(torch.zeros(16), torch.ones(16))
    vae = vae.to(torch.bfloat16).eval().requires_grad_(False).to_channels_last()
    tae = random_init_(TAEHV(TAEHVConfig(encoder_channels=None)).cuda(), seed + 1)
    tae = tae.to(torch.bfloat16).eval().requires_grad_(False)
    return vae, tae


def channels_last_taehv(tae: TAEHV) -> TAEHV:
    import copy
    return copy.deepcopy(tae).to(memory_format=torch.channels_last)


def run_variant(name, m, vae, tae, cross_ctx, blocks, graphs, compile_, sink, window, decoders, seed=0,
                keep=4):
    m.compile_elementwise(compile_)
    cfg = m.cfg
    torch.cuda.synchronize()
    t_start = time.perf_counter()
    cache = SelfKVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim, LATENT_HW[0] * LATENT_HW[1] // 4,
                        sink_frames=sink, window_frames=window, dtype=torch.bfloat16, device="cuda")
    den = CausalDenoiser(m, cache, m.prepare_cross(cross_ctx), graphs=graphs)
    if compile_:
        den.prepare(torch.zeros(1, FPB, 16, *LATENT_HW, device="cuda"))
    marks = {}

    def denoise(x, t, f):
        out = den(x, t, f)
        marks["n"] = marks.get("n", 0) + 1
        if marks["n"] % 5 == 4:
            marks["ev"].record()
        return out

    schedule = ARSchedule.build(FlowMatchTable(shift=5.0), [1000, 750, 500, 250])
    roll = ARRollout(denoise, schedule, FPB, None, seed=seed)
    g = torch.Generator(device="cuda").manual_seed(seed)
    wan = StreamingDecoder(vae, zero_init=True, clamp=True, graphs=graphs) if "wan" in decoders else None
    taehv = TaehvStream(tae, graphs) if "taehv" in decoders else None
    rows, lat = [], []
    for b in range(blocks):
        noise = torch.randn(1, FPB, 16, *LATENT_HW, generator=g, device="cuda")
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(6)]
        marks["ev"] = ev[1]
        torch.cuda.synchronize()
        wall = time.perf_counter()
        ev[0].record()
        x0 = roll.step(noise)
        ev[2].record()
        if taehv is not None:
            frames_t = taehv(x0)
        ev[3].record()
        if wan is not None:
            z = x0.permute(0, 2, 1, 3, 4).to(torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
            frames_w = wan.decode_chunk(z)
        ev[4].record()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - wall) * 1e3
        dit, kv = ev[0].elapsed_time(ev[1]), ev[1].elapsed_time(ev[2])
        row = {"variant": name, "block": b, "dit_ms": round(dit, 2), "kv_ms": round(kv, 2),
               "taehv_ms": round(ev[2].elapsed_time(ev[3]), 2), "wan_ms": round(ev[3].elapsed_time(ev[4]), 2),
               "wall_ms": round(wall, 1), "mem_gib": round(torch.cuda.memory_allocated() / 2**30, 3),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
               "finite": bool(torch.isfinite(x0).all())}
        row["total_taehv_ms"] = round(dit + kv + row["taehv_ms"], 2)
        row["total_wan_ms"] = round(dit + kv + row["wan_ms"], 2)
        if b == 0:
            row["cold_start_s"] = round(time.perf_counter() - t_start, 2)
            if taehv is not None:
                row["taehv_frames"] = list(frames_t.shape)
            if wan is not None:
                row["wan_frames"] = list(frames_w.shape)
        row["graphs"] = {"dit": den.graph_status(), "wan": wan.graph_status() if wan else None,
                         "taehv": taehv.graphs.status() if taehv else None}
        rows.append(row)
        log(row, "w1.jsonl")
        if b < keep or b == blocks - 1:
            lat.append((b, x0.float().cpu()))
    del den, cache, wan, taehv
    gc.collect()
    torch.cuda.empty_cache()
    return rows, lat


def summarize(name, rows, ref_lat, lat):
    def med(key, sel):
        vals = [r[key] for r in rows if sel(r["block"])]
        return round(median(vals), 2) if vals else None

    s = {"kind": "summary", "variant": name, "cold_start_s": rows[0].get("cold_start_s")}
    for key in ("dit_ms", "kv_ms", "taehv_ms", "wan_ms", "total_taehv_ms", "total_wan_ms"):
        s[key + "@5"] = next((r[key] for r in rows if r["block"] == 5), None)
        s[key + "@steady"] = med(key, lambda b: b >= 7)
    steady = [r for r in rows if r["block"] >= 7]
    if steady:
        s["steady_total_taehv_range"] = [min(r["total_taehv_ms"] for r in steady),
                                         max(r["total_taehv_ms"] for r in steady)]
        s["steady_mem_gib_range"] = [min(r["mem_gib"] for r in steady), max(r["mem_gib"] for r in steady)]
    s["graphs"] = rows[-1]["graphs"]
    if ref_lat is not None:
        s["latent_rel_err_vs_first_variant"] = {b: round(rel_err(x, dict(ref_lat)[b]), 5)
                                                for b, x in lat if b in dict(ref_lat)}
    log(s, "w1.jsonl")
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="eager,graphs,compile")
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--sink", type=int, default=0)
    ap.add_argument("--window", type=int, default=21)
    ap.add_argument("--decoders", default="taehv,wan")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    m = build_dit()
    vae, tae = build_decoders()
    torch.cuda.synchronize()
    log({"kind": "config", "env": env(), "load_s": round(time.perf_counter() - t0, 2), "blocks": args.blocks,
         "sink": args.sink, "window": args.window, "dit_params": sum(p.numel() for p in m.parameters()),
         "vae_params": sum(p.numel() for p in vae.parameters()),
         "taehv_params": sum(p.numel() for p in tae.parameters())}, "w1.jsonl")
    ctx = torch.randn(1, 512, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(7))
    ref, sums = None, []
    for v in args.variants.split(","):
        rows, lat = run_variant(v, m, vae, tae, ctx, args.blocks, graphs=v != "eager", compile_=v == "compile",
                                sink=args.sink, window=args.window, decoders=args.decoders.split(","))
        sums.append(summarize(v, rows, ref, lat))
        ref = ref if ref is not None else lat
    print(f"\n{'variant':8} {'cold s':>7} {'DiT@5':>7} {'KV@5':>6} {'TAE@5':>6} {'Wan@5':>6} "
          f"{'tot+TAE@5':>9} {'tot+Wan@5':>9} {'tot+TAE st':>10} {'tot+Wan st':>10}")
    for s in sums:
        print(f"{s['variant']:8} {s['cold_start_s'] or 0:7.1f} {s['dit_ms@5'] or 0:7.1f} {s['kv_ms@5'] or 0:6.1f} "
              f"{s['taehv_ms@5'] or 0:6.1f} {s['wan_ms@5'] or 0:6.1f} {s['total_taehv_ms@5'] or 0:9.1f} "
              f"{s['total_wan_ms@5'] or 0:9.1f} {s['total_taehv_ms@steady'] or 0:10.1f} "
              f"{s['total_wan_ms@steady'] or 0:10.1f}")


if __name__ == "__main__":
    main()
