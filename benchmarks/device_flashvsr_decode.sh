#!/usr/bin/env bash
# One device call (one H100/H200, ~2 min): FlashVSR's decode side (issue 16, helper 16b).
#  1. the flashvsr_tcdecoder golden replayed in fp32 on CUDA (TF32 off): max abs error (plain and fused);
#  2. TCDecoder per steady 8-frame chunk (2 latents + 8 LQ frames) at 768x1408 and 1280x704 output, release
#     widths [512,256,128,128], bf16, random weights: ref / fused / fused+CUDA graphs, median of 20 (CUDA events),
#     error vs ref, AdaIN and wavelet colour fix of one chunk;
#  3. CPU LQ prep of one chunk (8 frames: PIL bicubic x4 and x2 + crop + [-1,1]), 1 thread vs 8 threads.
# Writes $OUT/flashvsr_decode.jsonl and $OUT/bench.log; prints a short table last.
set -u
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
timeout 400 python3 -m benchmarks.flashvsr_decode_bench > "$OUT/bench.log" 2> "$OUT/bench.err" \
  || { echo "bench failed"; tail -20 "$OUT/bench.err"; }
python3 - "$OUT" <<'PY'
import json, sys, pathlib
p = pathlib.Path(sys.argv[1]) / "flashvsr_decode.jsonl"
rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []
for r in rows:
    if r["what"] == "golden_fp32":
        print(f"golden fp32 on {r['device']} fused={r['fused']}: max abs err {r['max_abs_err']:.2e} (atol {r['atol_frames']})")
print(f"{'size':9} {'variant':13} {'chunk ms':>8} {'ms/frame':>8} {'rel err':>8} {'adain':>6} {'wavelet':>7} {'GiB':>5}")
for r in rows:
    if r["what"] == "decoder":
        print(f"{r['size']:9} {r['variant']:13} {r['steady_ms_median']:8.2f} {r['ms_per_frame']:8.2f} "
              f"{r.get('rel_err_vs_ref', 0):8.1e} {r['adain_ms']:6.2f} {r['wavelet_ms']:7.2f} {r.get('peak_gib', 0):5.1f}")
for r in rows:
    if r["what"] == "lq_prep_cpu_skipped":
        print(f"LQ prep not timed: {r['why']}")
    if r["what"] == "lq_prep_cpu":
        print(f"LQ prep {r['size']} x{r['scale']:g} {r['src']}->{r['out']}: {r['ms_per_8_frames']:.1f} ms / 8 frames "
              f"(8 threads {r['ms_per_8_frames_8_threads']:.1f}, {r['cpus']} cpus)")
PY
