"""The FFN middle of the FP8 DiT at W1's shape (4,680 tokens x 8,960): GELU-tanh + per-token e4m3 quantisation
as the Triton kernel (nodes/common/fp8_kernels.py) vs the torch.compile'd formula it replaced. CUDA events,
median of 50 after warmup; GB/s counts one bf16 read and one e4m3 write of the tensor.

    python3 -m benchmarks.fp8_gelu_probe
"""
from __future__ import annotations

import json

import torch

from benchmarks.common import events_ms
from nodes.common.fp8_kernels import gelu_quantize_rows, gelu_quantize_rows_formula


def main() -> None:
    x = torch.randn(4680, 8960, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(gelu_quantize_rows_formula, dynamic=False, fullgraph=True)
    moved = x.numel() * 3 / 1e9
    r8, rs = compiled(x)
    runs = [("compiled_formula", lambda: compiled(x))]
    runs += [(f"triton_tanh{t}_w{w}", (lambda t=t, w=w: gelu_quantize_rows(x, tanh=t, num_warps=w)))
             for t in (0, 1, 2) for w in (4, 8, 16, 32)]
    for name, fn in runs:
        try:
            ms, _ = events_ms(fn, reps=30, warmup=3)
            q8, qs = fn()
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result
            print(json.dumps({"gelu_quant": name, "error": repr(e)[:200]}))
            continue
        same = (q8.view(torch.uint8) == r8.view(torch.uint8)).float().mean().item()
        print(json.dumps({"gelu_quant": name, "shape": list(x.shape), "us": round(ms * 1e3, 1),
                          "GB_per_s": round(moved / ms * 1e3), "bytes_equal_formula": round(same, 5),
                          "scale_max_rel_diff": float(((qs - rs).abs() / rs).max())}))


if __name__ == "__main__":
    main()
