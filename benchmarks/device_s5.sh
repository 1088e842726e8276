#!/usr/bin/env bash
# Session-5 device calls (issue 19), one stage per call, on one warm machine in this order (each carry fits the
# 64 MiB limit with the tree; FA4's 62 MB cutlass-dsl-libs archive goes as pieces .fa4q1 + .fa4q2 into
# /tmp/fa4blob, which benchmarks/device_fa4.sh unpacks):
#   vae       carry .whl .fa4q1   FP8 GPU tests; Wan VAE streamed block with / without the tap-sum head
#   decode    carry .fa4q2        W2's one-shot Wan VAE decode (21 latent frames); W1 fast with the Wan VAE
#   fa4w2     carry .fa4b .baseline   W2 ms per CFG step, cuDNN vs FlashAttention-4, beside the official Wan forward
#   official  carry .baseline     the official Self-Forcing runner beside fd bench W1 fast and bf16 (TAEHV)
set -u
stage=$1
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR=/tmp/fd_inductor_cache
mkdir -p /tmp/fa4blob
for d in .fa4q1 .fa4q2; do [[ -d $d ]] && cp $d/part.* /tmp/fa4blob/; done
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
W1="inputs.num_blocks=12 nodes.sampler.params.window_frames=21 --warmup 2 --blocks 10 --report-block 5 --json"
FAST="nodes.dit.params.precision=fp8 nodes.dit.params.attention_precision=fp8 nodes.dit.params.kv_dtype=fp8 \
nodes.dit.params.context_pass=reuse"
w1() {  # name, decoder overrides + extra overrides
  local name=$1; shift
  timeout 240 python3 -m flashdreams_cli.main bench bench_self_forcing $W1 "$@" > "$OUT/$name.json" \
    2> "$OUT/$name.err" || { echo "$name:"; tail -15 "$OUT/$name.err"; }
}
case $stage in
  vae)
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_gpu.py > "$OUT/pytest_fp8.txt" 2>&1
    tail -2 "$OUT/pytest_fp8.txt"
    timeout 300 python3 -m benchmarks.vae_decode --decoders wan --variants compile_nofast,compile --profile compile \
      > "$OUT/vae_decode.txt" 2>&1 || tail -20 "$OUT/vae_decode.txt"
    grep -v '^{' "$OUT/vae_decode.txt" | tail -3
    python3 -c "
import json
for l in open('$OUT/vae_decode.jsonl'):
    r = json.loads(l)
    if 'profile' in r:
        print(r['kernel_ms'], r['by_category_ms']); [print(k) for k in r['top_kernels'][:10]]"
    ;;
  decode)
    timeout 420 python3 -m benchmarks.w2_steps --variants "" --decode fast,plain --out "$OUT/w2_decode.jsonl" \
      > "$OUT/w2_decode.log" 2>&1 || tail -8 "$OUT/w2_decode.log"
    grep '^{' "$OUT/w2_decode.log"
    w1 w1_fast_wanvae $FAST
    python3 -m benchmarks.summarize_fd_bench "$OUT/w1_fast_wanvae.json"
    ;;
  fa4w2)
    FA4_PROBE=0 FA4_W1_BACKENDS="flash4" FA4_W2=1 bash benchmarks/device_fa4.sh
    SF_ROOT=$PWD/.baseline/self_forcing timeout 200 python3 .baseline/harness/official_wan_bench.py \
      > "$OUT/official_w2.jsonl" 2> "$OUT/official_w2.err" || tail -5 "$OUT/official_w2.err"
    grep -h '^{' "$OUT/official_w2.jsonl" | cut -c1-300
    ;;
  official)
    w1 w1_fast nodes.decoder.type=taehv.decode $FAST
    w1 w1_bf16 nodes.decoder.type=taehv.decode
    SF_ROOT=$PWD/.baseline/self_forcing timeout 240 python3 .baseline/harness/official_selfforcing_bench.py \
      > "$OUT/official.jsonl" 2> "$OUT/official.err" || tail -5 "$OUT/official.err"
    python3 -m benchmarks.summarize_fd_bench "$OUT/w1_fast.json" "$OUT/w1_bf16.json" --official "$OUT/official.jsonl"
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
