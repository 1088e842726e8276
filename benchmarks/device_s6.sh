#!/usr/bin/env bash
# Session-6 device calls (issue 19: the Wan VAE decoder with every cuDNN plan autotuned), one warm machine:
#   vae       carry .whl        Wan VAE streamed block (W1 shapes, kernel profile) and W2's 21-frame decode
#   w1        carry .baseline   fd bench W1 fast with the Wan VAE, beside the official Self-Forcing runner
#   w2decode  carry .whl        W2 21-frame decode, 4 and 3 latent frames per decoder call (chunk4, chunk3)
set -u
stage=$1
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR=/tmp/fd_inductor_cache
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
W1="inputs.num_blocks=12 nodes.sampler.params.window_frames=21 --warmup 2 --blocks 10 --report-block 5 --json"
FAST="nodes.dit.params.precision=fp8 nodes.dit.params.attention_precision=fp8 nodes.dit.params.kv_dtype=fp8 \
nodes.dit.params.context_pass=reuse"
w1() {  # name, overrides
  local name=$1; shift
  timeout 240 python3 -m flashdreams_cli.main bench bench_self_forcing $W1 "$@" > "$OUT/$name.json" \
    2> "$OUT/$name.err" || { echo "$name:"; tail -15 "$OUT/$name.err"; }
}
case $stage in
  vae)
    timeout 240 python3 -m benchmarks.vae_decode --decoders wan --variants compile --profile compile \
      > "$OUT/vae_decode.txt" 2>&1 || tail -20 "$OUT/vae_decode.txt"
    grep -v '^{' "$OUT/vae_decode.txt" | grep -v Warn | tail -3
    python3 -c "
import json
for l in open('$OUT/vae_decode.jsonl'):
    r = json.loads(l)
    if 'profile' in r:
        print(r['kernel_ms'], r['by_category_ms']); [print(k) for k in r['top_kernels'][:10]]"
    timeout 400 python3 -m benchmarks.w2_steps --variants "" --decode fast --out "$OUT/w2_decode.jsonl" \
      > "$OUT/w2_decode.log" 2>&1 || tail -8 "$OUT/w2_decode.log"
    grep '^{' "$OUT/w2_decode.log" | cut -c1-300
    ;;
  w1)
    w1 w1_fast_wanvae $FAST
    SF_ROOT=$PWD/.baseline/self_forcing timeout 240 python3 .baseline/harness/official_selfforcing_bench.py \
      > "$OUT/official.jsonl" 2> "$OUT/official.err" || tail -5 "$OUT/official.err"
    python3 -m benchmarks.summarize_fd_bench "$OUT/w1_fast_wanvae.json" --official "$OUT/official.jsonl"
    ;;
  w2decode)
    timeout 560 python3 -m benchmarks.w2_steps --variants "" --decode chunk4,chunk3 --out "$OUT/w2_decode.jsonl" \
      > "$OUT/w2_decode.log" 2>&1 || tail -8 "$OUT/w2_decode.log"
    grep '^{' "$OUT/w2_decode.log" | cut -c1-300
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
