#!/usr/bin/env bash
# One device call (one H100/H200, ~3 min): FlashVSR's Triton block-sparse kernel (issue 16).
#  1. pytest tests/test_flashvsr_triton_gpu.py: the kernel vs the dense masked reference (fp32 + bf16, several
#     shapes/densities, empty query blocks), the sparse-attention and streaming-DiT goldens through it on CUDA;
#  2. kernel rows: max error vs the float32 masked reference and ms vs cuDNN dense SDPA at the same shape
#     (real FlashVSR shapes: 12 heads x 128, 768x1408 / 1280x768 / 1280x640 steady and first chunks);
#  3. chunk rows: full-size streaming chunk (random weights, bf16, dim 1536, 30 layers, 12 heads, ffn 8960, LQ
#     projector 2048/3072), LQ projection + DiT per 8-frame chunk, sparse and dense, median of 8 steady chunks.
# Writes $OUT/pytest.txt, flashvsr_kernel.jsonl, flashvsr_chunk.jsonl; prints a short table last.
set -u
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,temperature.gpu --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_flashvsr_triton_gpu.py > "$OUT/pytest.txt" 2>&1
echo "pytest rc=$? $(tail -1 "$OUT/pytest.txt")"
timeout 150 python3 -m benchmarks.flashvsr_bench kernel > "$OUT/kernel.log" 2> "$OUT/kernel.err" \
  || { echo "kernel bench failed"; tail -15 "$OUT/kernel.err"; }
timeout 300 python3 -m benchmarks.flashvsr_bench chunk > "$OUT/chunk.log" 2> "$OUT/chunk.err" \
  || { echo "chunk bench failed"; tail -15 "$OUT/chunk.err"; }
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def rows(n):
    p = out / n
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []
print(f"{'kernel shape':24} {'mask':6} {'dens':>5} {'max_err':>9} {'triton ms':>9} {'cudnn ms':>9} {'x':>5} {'TF/s':>5}")
for r in rows("flashvsr_kernel.jsonl"):
    print(f"{r['shape']:24} {r['mask']:6} {r['density']:5.2f} {r['max_err']:9.2e} {r['triton_ms']:9.2f} "
          f"{r.get('cudnn_ms', 0):9.2f} {r.get('speedup', 0):5.2f} {r.get('triton_tflops', 0):5.0f}")
print(f"{'chunk size':12} {'attention':9} {'chunk0 ms':>9} {'steady ms':>9} {'ms/frame':>8} {'peak GiB':>8}")
for r in rows("flashvsr_chunk.jsonl"):
    print(f"{r['size']:12} {r['attention']:9} {r['chunk0_ms']:9.1f} {r['steady_ms_median']:9.1f} "
          f"{r['ms_per_frame']:8.2f} {r['peak_gib']:8.1f}")
PY
