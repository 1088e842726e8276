"""W2: bidirectional Wan 2.1 T2V 1.3B (81 frames at 480x832 = 21 latent frames, 32,760 tokens; UniPC, CFG 5)
with RANDOM weights, through the product's nodes: the ms of one CFG step of `wan.t2v_sampler` (the sampler's
own loop: the two passes, guidance, the UniPC update) for cfg separate / batched, in bf16 and with the FP8
fast mode (fp8 linears + fp8 attention), and the Wan VAE decode of the 21 latent frames (`wan.vae_decode`).

A step's ms is (T(n2) - T(n1)) / (n2 - n1) over two sampler runs of n1 and n2 steps after a warm run (compile),
so the prompt preparation and the first call's costs cancel. Prints one JSON line per row.

    python3 -m benchmarks.w2_steps --out w2.jsonl          # GPU
    python3 -m benchmarks.w2_steps --dry                   # CPU, tiny model: the same code paths
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from engine.node import NodeContext, Step
from engine.spec import load_spec

VARIANTS = {   # name: (cfg, dit params)
    "bf16_separate": ("separate", {}),
    "bf16_batched": ("batched", {}),
    "bf16_batched_flash4": ("batched", {"attention": "flash4"}),      # needs FA4 (device_fa4.sh sets it up)
    "fp8_separate": ("separate", {"precision": "fp8", "attention_precision": "fp8"}),
    "fp8_batched": ("batched", {"precision": "fp8", "attention_precision": "fp8"}),
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t) * 1e3


def gpu_timeline(fn, top: int = 40) -> dict:
    """One call of ``fn`` under the profiler: how long the GPU was busy (the union of kernel intervals) against the
    span from the call's start, so host-side time the GPU waits on (launch-bound stretches) shows as idle."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    from benchmarks.vae_decode import _category
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:   # CUDA only: no host-side profiling overhead
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    kernels = sorted((ev.time_range.start, ev.time_range.end, ev.name) for ev in prof.events()
                     if ev.device_type == torch.autograd.DeviceType.CUDA)
    if not kernels:
        return {"wall_ms": round(wall, 1), "error": "the profiler saw no kernels"}
    per_cat, per_kernel = defaultdict(float), defaultdict(lambda: [0.0, 0])
    busy, gaps, end = 0.0, [], kernels[0][0]
    for a, b, name in kernels:
        per_cat[_category(name)] += (b - a) / 1e3
        per_kernel[name][0] += (b - a) / 1e3
        per_kernel[name][1] += 1
        if a > end:
            gaps.append(((a - end) / 1e3, (end - kernels[0][0]) / 1e3))
        busy += max(0.0, b - max(a, end)) / 1e3
        end = max(end, b)
    span = (end - kernels[0][0]) / 1e3
    return {"wall_ms": round(wall, 1), "kernel_span_ms": round(span, 1), "gpu_busy_ms": round(busy, 1),
            "gpu_idle_ms": round(span - busy, 1), "kernels": len(kernels),
            "idle_in_first_50ms": round(sum(g for g, at in gaps if at < 50), 1),
            "longest_gaps_ms_at_ms": [[round(g, 2), round(at, 1)] for g, at in sorted(gaps, reverse=True)[:8]],
            "by_category_ms": {k: round(v, 1) for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms_count": [[n[:110], round(t, 2), c] for n, (t, c) in
                                     sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]]}


def main() -> None:
    from nodes.wan.node_dit import WanDiTNode
    from nodes.wan.node_t2v import WanT2VSamplerNode
    from nodes.wan.node_vae import WanVAEDecodeNode
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if "flash4" not in v))
    ap.add_argument("--steps", default="2,5", help="n1,n2 sampler steps of the two timed runs")
    ap.add_argument("--decode", default="fast,plain",
                    help="Wan VAE decode variants to time: fast, plain, chunkN (N latent frames per call after the "
                         "first), chunkN_graphs (later calls replayed as CUDA graphs), spec (as "
                         "specs/wan21_t2v_1.3b.yaml sets it); suffix _maxat: the glue compiled with Inductor's "
                         "max-autotune, _nofold: residual sums written out first, _sdpa: SDPA attention; '' for none")
    ap.add_argument("--decode-runs", type=int, default=3, help="timed decodes per variant after the first")
    ap.add_argument("--decode-profile", action="store_true",
                    help="after timing each decode variant, profile one more decode: GPU busy vs idle time, the "
                         "longest idle gaps, kernel time by category")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = "cpu" if args.dry else "cuda"
    if args.dry:
        dit_base = dict(weights="random", dim=32, ffn_dim=48, num_heads=2, num_layers=1, text_dim=8, text_len=6,
                        dtype="fp32")
        shape = dict(frames=5, latent_height=4, latent_width=6)
        vae_p = dict(checkpoint="random", dim=8, dtype="fp32")
    else:
        dit_base = dict(weights="random", preset="1.3b", dtype="bf16")
        shape = dict(frames=81, latent_height=60, latent_width=104)
        vae_p = dict(checkpoint="random", dtype="bf16")
    out = open(args.out, "w") if args.out else None

    def emit(row):
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")

    n1, n2 = (int(x) for x in args.steps.split(","))
    for name in [v for v in args.variants.split(",") if v]:
        cfg, extra = VARIANTS[name]
        if args.dry and extra:                 # FP8 compute is refused on CPU: the dry run checks the plumbing only
            extra = {}
        try:
            dit = WanDiTNode("dit", {**dit_base, **extra}, dev)
            dit.load()
            c = dit.model.cfg
            g = torch.Generator(device=dev).manual_seed(0)
            text = torch.randn(1, c.text_len, c.text_dim, generator=g, device=dev)
            neg = torch.randn(1, c.text_len, c.text_dim, generator=g, device=dev)

            def run(n):
                node = WanT2VSamplerNode("sampler", {"num_steps": n, "cfg": cfg, **shape}, dev)
                return node.run({"model": dit.handle, "text": text, "negative": neg}, None, Step(0, {}))["latent"]

            warm_ms = timed(lambda: run(n1))
            t1, t2 = timed(lambda: run(n1)), timed(lambda: run(n2))
            emit({"w2": name, "cfg": cfg, "dit_params": extra, "ms_per_cfg_step": round((t2 - t1) / (n2 - n1), 1),
                  "runs_ms": {n1: round(t1, 1), n2: round(t2, 1)}, "first_run_ms": round(warm_ms, 1),
                  "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None})
            del dit
        except Exception as e:  # noqa: BLE001 - one variant failing is a result; the others still run
            emit({"w2": name, "error": repr(e)[:300]})
        if dev == "cuda":
            torch.cuda.empty_cache()
    from nodes.wan.vae_blocks import FusedOps
    f_lat = (shape["frames"] - 1) // 4 + 1
    z = torch.randn(1, f_lat, 16, shape["latent_height"], shape["latent_width"], device=dev)
    # fast: the node's default (tap-sum head on CUDA); plain: without it; chunkN: fast, N latent frames per call
    reference = None
    for convs in [c for c in args.decode.split(",") if c]:
        name, *flags = convs.split("_")   # _graphs: later chunks replayed as CUDA graphs; _maxat: Inductor
        #                                   max-autotune (with coordinate-descent tuning) for the pointwise glue;
        #                                   _nofold: residual sums written, not added in the next norm window;
        #                                   _sdpa: the VAE attention on SDPA at every head dim
        if name == "spec":                        # the decoder as specs/wan21_t2v_1.3b.yaml configures it
            node_spec = load_spec("wan21_t2v_1.3b").nodes["decoder"]
            params = {**node_spec.params, **vae_p}
            capture = node_spec.capture is not False and dev == "cuda"
        else:
            params = {**vae_p, "chunk": int(name[len("chunk"):]) if name.startswith("chunk") else 0}
            capture = "graphs" in flags
        vae = WanVAEDecodeNode("decoder", params, NodeContext(device=dev, capture=capture))
        vae.load()
        glue = dev == "cuda"
        vae._fused_ops[glue] = FusedOps(compile=glue, tap_head=glue and name != "plain",
                                        mode="max-autotune-no-cudagraphs" if "maxat" in flags else None,
                                        fold_residuals="nofold" not in flags,
                                        **({"matmul_attention_min_dim": 1 << 30} if "sdpa" in flags else {}))
        dec = lambda: vae.run({"latent": z}, vae.new_state(), Step(0, {}))  # noqa: E731
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        warm = timed(dec)
        times = [timed(dec) for _ in range(args.decode_runs)]
        pixels = dec()["pixels"].cpu()           # on the host: later variants' peak memory stays their own
        if reference is None:                     # every variant's frames against the first variant's
            reference = (convs, pixels)
        diff = (pixels - reference[1]).abs()
        emit({"w2": "wan_vae_decode", "convs": convs, "latent_frames": f_lat, "ms": round(min(times), 1),
              "vs": reference[0], "max_abs_diff": round(diff.max().item(), 5), "mean_abs_diff": diff.mean().item(),
              "median_ms": round(statistics.median(times), 1), "runs_ms": [round(t, 1) for t in times],
              "first_ms": round(warm, 1), "graphs": vae.graph_status(),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None})
        if args.decode_profile and dev == "cuda":
            emit({"w2": "wan_vae_decode_profile", "convs": convs, **gpu_timeline(dec)})
        del vae, dec
        if dev == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
