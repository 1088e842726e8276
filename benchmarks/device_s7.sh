#!/usr/bin/env bash
# Session-7 device calls (issue 19: W2's 21-frame Wan VAE decode), one warm machine:
#   w2decode  carry .whl
#             W2 decode as the first latent frame then 5 or 4 per call (eager, and later calls as CUDA graphs)
#   spec_w2decode  carry .whl: W2 decode with the decoder settings of specs/wan21_t2v_1.3b.yaml, 20 runs
#   official_w2  carry .baseline/self_forcing, .baseline/harness: the official Wan 2.1 forward + decode
#   w1        carry .whl, .baseline/self_forcing, .baseline/harness
#             fd bench W1 fast with the Wan VAE beside the official Self-Forcing runner (device_s6.sh w1)
set -u
stage=$1
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR=/tmp/fd_inductor_cache
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
case $stage in
  w2decode)
    timeout 420 python3 -m benchmarks.w2_steps --variants "" --decode chunk5_graphs,chunk5,chunk4_graphs,chunk4 --decode-runs 10 \
      --out "$OUT/w2_decode.jsonl" > "$OUT/w2_decode.log" 2>&1 || tail -8 "$OUT/w2_decode.log"
    grep '^{' "$OUT/w2_decode.log" | cut -c1-400
    ;;
  spec_w2decode)
    timeout ${LIMIT:-240} python3 -m benchmarks.w2_steps --variants "" --decode ${DECODE:-spec} --decode-runs ${RUNS:-20} ${PROFILE:-} \
      --out "$OUT/w2_decode_spec.jsonl" > "$OUT/w2_decode_spec.log" 2>&1 || tail -8 "$OUT/w2_decode_spec.log"
    grep '^{' "$OUT/w2_decode_spec.log" | cut -c1-600
    ;;
  official_w2)
    SF_ROOT=$PWD/.baseline/self_forcing timeout 150 python3 .baseline/harness/official_wan_bench.py \
      > "$OUT/official_w2.jsonl" 2> "$OUT/official_w2.err" || tail -5 "$OUT/official_w2.err"
    cat "$OUT/official_w2.jsonl"
    ;;
  w1)  # session 6's W1 stage (fd bench W1 fast with the Wan VAE beside the official runner); call 4 ran its copy
    bash benchmarks/device_s6.sh w1
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
