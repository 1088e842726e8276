#!/usr/bin/env bash
# One device call (issue 17): Cosmos-Predict2.5-2B at full size on one GPU, random weights, bf16, 1280x720,
# 93 frames (24 latent frames, 86,400 tokens). Cosmos-Reason1-7B (random) encodes both prompts and is offloaded
# first, then: DiT forward, CFG as two forwards and batched, the UniPC step, ceilings (matmul, SDPA) at the
# same shapes, the Wan VAE decode of the 24 latent frames, peak memory, the projected 35-step (36-call) time.
# Estimated run time on an H100: ~3 min (each forward is ~2 PFLOP). Results: $OUT/cosmos_predict25.jsonl.
#   COSMOS_SKIP=text,vae,ceil   skips parts (e.g. COSMOS_SKIP=vae for a shorter run)
set -u
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,temperature.gpu --format=csv,noheader
timeout 420 python3 -m benchmarks.cosmos_predict25 --reps 2 --out "$OUT" 2> "$OUT/cosmos_predict25.err" \
  | grep -v '^\[transformers\]' | tee "$OUT/cosmos_predict25.out" | tail -16
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || { echo "exit $rc"; tail -25 "$OUT/cosmos_predict25.err"; }
