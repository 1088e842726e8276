#!/usr/bin/env bash
# One device call (one H200): fd bench of causal Wan 2.2 A14B at full size with random weights
# (specs/bench_causal_wan22.yaml: 480x832, 3 latent frames per block, 8 steps + context pass into both
# experts' caches, window 21, bf16), Wan VAE and TAEHV decoders. Per-block ms split into DiT (all 8
# denoising steps) / KV (the context pass, both experts) / decode, and peak memory, block 5 reported.
# Expects the same .whl set as device_w1.sh. Writes into $OUT. No numbers from it are in BENCHMARKS.md yet.
set -u
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,temperature.gpu --format=csv,noheader
B="--warmup 2 --blocks 6 --report-block 5 --json"
python3 -m flashdreams_cli.main bench bench_causal_wan22 $B > "$OUT/wan22_wan.json" 2> "$OUT/wan22_wan.err" \
  || tail -20 "$OUT/wan22_wan.err"
python3 -m flashdreams_cli.main bench bench_causal_wan22 nodes.decoder.type=taehv.decode $B \
  > "$OUT/wan22_taehv.json" 2> "$OUT/wan22_taehv.err" || tail -20 "$OUT/wan22_taehv.err"
python3 -m benchmarks.summarize_fd_bench "$OUT/wan22_taehv.json" "$OUT/wan22_wan.json"
