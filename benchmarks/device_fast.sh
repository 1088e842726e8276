#!/usr/bin/env bash
# One device call: is fast mode (self_forcing_fast) faster with the tensor-scaled FP8 cache, the e4m3 attention
# output into the o projection and the fused input quantisers? The FP8 GPU tests, a kernel profile of one
# steady-window fast forward, then `fd bench` W1 fast (TAEHV) with graphs replayed, and (FAST_BF16=1) the bf16
# cuDNN baseline in the same call; FAST_VAE=1: the Wan VAE block decode with and without the conv
# reformulations (benchmarks/vae_decode.py). Carry: .whl (omegaconf, antlr4, nvidia-cudnn-frontend).
set -u
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export TORCHINDUCTOR_CACHE_DIR=/tmp/fd_inductor_cache
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_gpu.py > "$OUT/pytest_fp8.txt" 2>&1
tail -4 "$OUT/pytest_fp8.txt"
timeout 150 python3 -m benchmarks.profile_dit --fast --block 8 --top 28 > "$OUT/profile_fast.txt" 2>&1 \
  || tail -20 "$OUT/profile_fast.txt"
W1="inputs.num_blocks=12 nodes.sampler.params.window_frames=21 --warmup 2 --blocks 10 --report-block 5 --json"
FAST="nodes.dit.params.precision=fp8 nodes.dit.params.attention_precision=fp8 nodes.dit.params.kv_dtype=fp8 \
nodes.dit.params.context_pass=reuse"   # = specs/self_forcing_fast.yaml's dit params, on the random-weight bench spec
runs="fast"; [[ -n "${FAST_BF16:-}" ]] && runs="fast bf16"
for r in $runs; do
  over=""; [[ $r == fast ]] && over="$FAST ${FAST_EXTRA:-}"
  timeout 200 python3 -m flashdreams_cli.main bench bench_self_forcing nodes.decoder.type=taehv.decode $W1 $over \
    > "$OUT/w1_$r.json" 2> "$OUT/w1_$r.err" || tail -20 "$OUT/w1_$r.err"
done
if [[ -n "${FAST_VAE:-}" ]]; then   # the Wan VAE streamed block: the conv reformulations on (compile) and off
  timeout 200 python3 -m benchmarks.vae_decode --decoders wan --variants compile_nofast,compile --profile compile \
    > "$OUT/vae_decode.txt" 2>&1 || tail -20 "$OUT/vae_decode.txt"
  grep -v '^{' "$OUT/vae_decode.txt" | tail -4
  grep '"profile"' "$OUT/vae_decode.txt" | cut -c1-900
fi
grep -v "^{" "$OUT/profile_fast.txt" | tail -40
python3 -m benchmarks.summarize_fd_bench "$OUT"/w1_*.json 2>/dev/null || for f in "$OUT"/w1_*.json; do
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1], r['report_blocks'].get('5',{}).get('wall_ms'), r['block_ms_median'])" "$f"; done
