#!/usr/bin/env bash
# One device call: fd bench W1 (TAEHV and Wan VAE decoders, window 21) and the official Self-Forcing
# harness side by side, then a short table. Expects .whl (omegaconf, antlr4, diffusers, importlib_metadata)
# and .baseline/{self_forcing,harness} carried (see shared/baselines/README.md). Writes into $OUT.
set -u
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
W1="inputs.num_blocks=12 nodes.sampler.params.window_frames=21 --warmup 2 --blocks 10 --report-block 5 --json"
python3 -m flashdreams_cli.main bench bench_self_forcing nodes.decoder.type=taehv.decode $W1 \
  > "$OUT/fd_taehv.json" 2> "$OUT/fd_taehv.err" || tail -20 "$OUT/fd_taehv.err"
python3 -m flashdreams_cli.main bench bench_self_forcing $W1 > "$OUT/fd_wan.json" 2> "$OUT/fd_wan.err" \
  || tail -20 "$OUT/fd_wan.err"
SF_ROOT=$PWD/.baseline/self_forcing timeout 240 python3 .baseline/harness/official_selfforcing_bench.py \
  > "$OUT/official.jsonl" 2> "$OUT/official.err" || tail -5 "$OUT/official.err"
python3 -m benchmarks.summarize_fd_bench "$OUT/fd_taehv.json" "$OUT/fd_wan.json" --official "$OUT/official.jsonl"
