"""FlashVSR on the GPU: the Triton block-sparse kernel against the masked reference and cuDNN dense attention,
and the full-size streaming chunk (random weights, bf16).

    python3 -m benchmarks.flashvsr_bench kernel     # error + ms per shape/density
    python3 -m benchmarks.flashvsr_bench chunk      # ms per 8-frame chunk (LQ projector + DiT) per output size
    python3 -m benchmarks.flashvsr_bench ... --dry  # tiny shapes on the CPU (TRITON_INTERPRET=1): a smoke test

Kernel rows: q/k/v bf16 [1, L, 12, 128] in window order, the mask either random at a density (per head and
query block) or the real draft mask of random q/k at that size. ``max_err`` = max |triton - reference| where
the reference is the dense masked formula in float32 on the same bf16 inputs (per head, to bound memory).
``cudnn_ms`` = dense SDPA (CUDNN_ATTENTION) on the same q/k/v: what sparsity must beat.

Chunk rows: flashvsr.dit random weights at the real 1.3B sizes (dim 1536, 30 layers, 12 heads, ffn 8960, LQ
projector 2048/3072, prompt [1, 512, 4096]), one stream per output size: chunk 0 (25 LQ frames -> 6 latents)
then steady chunks (8 LQ frames -> 2 latents, 4 temporal blocks attended), each timed with CUDA events
around upscaler.run (LQ projection + noise + DiT + x0); median of the steady chunks after warmup. The TC
decoder is not included (it is the other half of the issue). Output sizes must be multiples of 128 px
(FlashVSR's windows): 1280x704 cannot run as is, so it is bracketed by 1280x640 (upstream's crop) and
1280x768 (padding up).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from statistics import median


def log(rec: dict, name: str) -> None:
    line = json.dumps(rec, default=str)
    print(line, flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, name), "a") as f:
            f.write(line + "\n")


def timed(fn, device: str, warmup: int, iters: int) -> float:
    from benchmarks.common import median_ms
    return median_ms(fn, iters, warmup, cuda=device != "cpu")


def reference(q, k, v, mask):
    """Dense masked attention in float32, head by head (bounded memory)."""
    import torch
    from nodes.flashvsr.sparse_attention import masked_attention
    outs = [masked_attention(q[:, :, h:h + 1].float(), k[:, :, h:h + 1].float(), v[:, :, h:h + 1].float(),
                             mask[:, h:h + 1]) for h in range(q.shape[2])]
    return torch.cat(outs, 2)


def kernel_rows(dry: bool):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    from nodes.flashvsr.sparse_attention import draft_block_mask, local_window_mask, topk_blocks
    from nodes.flashvsr.sparse_triton import sparse_attention
    device = "cpu" if dry else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16
    heads, d = (2, 16) if dry else (12, 128)
    # (label, query temporal blocks, key temporal blocks, windows per temporal block (rows, cols), density)
    grid = [("tiny", 1, 2, (1, 2), 0.5), ("tiny-draft", 1, 2, (1, 2), "draft")] if dry else [
        ("768x1408 steady", 1, 4, (6, 11), 0.1), ("768x1408 steady", 1, 4, (6, 11), 0.25),
        ("768x1408 steady", 1, 4, (6, 11), 0.5), ("768x1408 steady", 1, 4, (6, 11), 1.0),
        ("768x1408 steady", 1, 4, (6, 11), "draft"), ("768x1408 first", 3, 3, (6, 11), "draft"),
        ("1280x768 steady", 1, 4, (6, 10), "draft"), ("1280x640 steady", 1, 4, (5, 10), "draft"),
        ("1280x768 steady D64", 1, 4, (6, 10), 0.3),
    ]
    g = torch.Generator(device=device).manual_seed(0)
    for label, tq, tk, (rows, cols), density in grid:
        hd = 64 if label.endswith("D64") else d
        nh = heads * d // hd
        nw = rows * cols
        lq, lk = tq * nw * 128, tk * nw * 128
        q = torch.randn(1, lq, nh, hd, generator=g, device=device, dtype=dtype)
        k, v = (torch.randn(1, lk, nh, hd, generator=g, device=device, dtype=dtype) for _ in range(2))
        if density == "draft":
            ratio = 2.0 * 768 * 1280 / (rows * 128 * cols * 128)
            mask = draft_block_mask(q, k, local_window_mask(rows, cols, 11, device=device),
                                    topk_blocks(ratio, rows * 8, cols * 8))
        else:
            mask = torch.rand(1, nh, lq // 128, lk // 128, generator=g, device=device) < density
        out = sparse_attention(q, k, v, mask)
        err = (out.float() - reference(q, k, v, mask)).abs().max().item()
        rec = {"kind": "kernel", "shape": label, "heads": nh, "head_dim": hd, "lq": lq, "lk": lk,
               "density": round(mask.float().mean().item(), 4), "mask": str(density), "max_err": err,
               "dtype": str(dtype).removeprefix("torch.")}
        warm, iters = (1, 2) if dry else (5, 30)
        rec["triton_ms"] = timed(lambda: sparse_attention(q, k, v, mask), device, warm, iters)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        if not dry:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                rec["cudnn_ms"] = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt), device, warm, iters)
            rec["speedup"] = rec["cudnn_ms"] / rec["triton_ms"]
            rec["triton_tflops"] = 4 * lq * lk * hd * nh * rec["density"] / rec["triton_ms"] / 1e9
        log(rec, "flashvsr_kernel.jsonl")


def chunk_rows(dry: bool, sizes: list[tuple[int, int]], attention: list[str], steady: int, warmup: int,
               compile: str = "auto"):
    import torch
    from nodes.flashvsr.node_dit import FlashVSRDiTNode, FlashVSRUpscalerNode
    device = "cpu" if dry else "cuda"
    params = dict(checkpoint="random", dtype="fp32" if dry else "bf16", compile=compile)
    if dry:
        params.update(dim=32, ffn_dim=32, num_heads=2, num_layers=1, text_dim=16, prompt_len=4, lq_hidden=[8, 8],
                      compile="off")
    node = FlashVSRDiTNode("dit", params, device)
    t0 = time.perf_counter()
    node.load()
    model = node.run({}, None, None)["model"]
    if not dry:
        torch.cuda.synchronize()
    print(f"# model ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    for h, w in sizes:
        for mode in attention:
            up = FlashVSRUpscalerNode("up", {"attention": mode})
            state = up.new_state()
            g = torch.Generator(device=device).manual_seed(1)
            frames = lambda t: torch.rand(1, t, 3, h, w, generator=g, device=device) * 2 - 1  # noqa: E731
            times, peak = [], 0
            if not dry:
                torch.cuda.reset_peak_memory_stats()
            for i in range(1 + warmup + steady):
                video = frames(25 if i == 0 else 8)
                ms = timed(lambda: up.run({"model": model, "video": video}, state, None), device, 0, 1)
                times.append(ms)
            if not dry:
                peak = torch.cuda.max_memory_allocated() / 2**30
            rec = {"kind": "chunk", "size": f"{w}x{h}", "attention": mode, "chunk0_ms": times[0],
                   "steady_ms_median": median(times[1 + warmup:]), "steady_ms_all": times[1:],
                   "peak_gib": peak, "ms_per_frame": median(times[1 + warmup:]) / 8, "chunk_frames": 8,
                   "topk_ratio": up.settings().ratio_for(h, w)}
            log(rec, "flashvsr_chunk.jsonl")
            up.release(state)   # drop this stream's window cache before the next size


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("kernel", "chunk"))
    ap.add_argument("--dry", action="store_true", help="tiny shapes on the CPU (smoke test)")
    ap.add_argument("--sizes", default="768x1408,640x1280,768x1280", help="output H x W list (multiples of 128)")
    ap.add_argument("--attention", default="sparse,dense")
    ap.add_argument("--steady", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                    help="torch.compile of the DiT's elementwise stages (flashvsr.dit's compile param)")
    a = ap.parse_args(argv)
    if a.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    with torch.no_grad():  # TF32 stays off: the kernel rows' float32 reference must be exact
        if a.what == "kernel":
            kernel_rows(a.dry)
        else:
            sizes = [(128, 256)] if a.dry else [tuple(int(x) for x in s.split("x")) for s in a.sizes.split(",")]
            chunk_rows(a.dry, sizes, a.attention.split(","), 2 if a.dry else a.steady, 1 if a.dry else a.warmup,
                       a.compile)


if __name__ == "__main__":
    main()
