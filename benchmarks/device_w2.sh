#!/usr/bin/env bash
# One device call (~5 min on one H100): W2, the bidirectional Wan 2.1 T2V 1.3B (81 frames at 480x832, 32,760 tokens,
# UniPC, CFG 5), RANDOM weights, beside the official runner in the same call.
#  (a) benchmarks/w2_steps.py: ms per CFG step of wan.t2v_sampler, cfg separate vs batched, bf16 vs FP8 fast mode
#      (fp8 linears + fp8 attention), and the Wan VAE decode of the 21 latent frames (wan.vae_decode);
#  (b) the official harness (shared/baselines/official_wan_bench.py: its forward x2 per CFG step, its VAE decode);
#  (c) fd bench wan21_t2v_1.3b, random weights, 4 steps, cfg batched: one clip end to end (the first run: its
#      sampler time includes the compile, so read (a) for the step figure).
# Expects .whl (omegaconf, antlr4, nvidia-cudnn-frontend) and, for (b), .baseline/self_forcing + .baseline/harness
# (official_selfforcing_bench.py and official_wan_bench.py) carried as for device_w1.sh.
# CPU check of the Python parts: DRY=1 OUT=/tmp/x bash benchmarks/device_w2.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [[ "${DRY:-0}" == 1 ]]; then
  PYTHONPATH=$PWD python3 -m benchmarks.w2_steps --dry --out "$OUT/w2.jsonl" && python3 - "$OUT" <<'PY'
import json, sys; [print(l.strip()) for l in open(sys.argv[1] + "/w2.jsonl")]
PY
  exit 0
fi
source benchmarks/device_env.sh
export TORCHINDUCTOR_CACHE_DIR=/tmp/fd_inductor_cache
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
timeout 300 python3 -m benchmarks.w2_steps --out "$OUT/w2.jsonl" > "$OUT/w2.log" 2>&1 || { echo "w2_steps:"; tail -12 "$OUT/w2.log"; }
if [[ -f .baseline/harness/official_wan_bench.py ]]; then
  SF_ROOT=$PWD/.baseline/self_forcing timeout 150 python3 .baseline/harness/official_wan_bench.py \
    > "$OUT/official_w2.jsonl" 2> "$OUT/official_w2.err" || tail -5 "$OUT/official_w2.err"
else
  echo "no .baseline/harness/official_wan_bench.py carried: official row skipped"
fi
RANDOM_W2="nodes.text.params.checkpoint=random nodes.text.params.tokenizer=bytes nodes.text.params.dtype=bf16 \
nodes.text.device=cuda nodes.text.offload=false nodes.dit.params.weights=random nodes.dit.params.dtype=bf16 \
nodes.dit.device=cuda nodes.sampler.device=cuda nodes.decoder.device=cuda \
nodes.decoder.params_by_type.wan.vae_decode.checkpoint=random nodes.decoder.params_by_type.wan.vae_decode.dtype=bf16"
timeout 200 python3 -m flashdreams_cli.main bench wan21_t2v_1.3b $RANDOM_W2 nodes.sampler.params.num_steps=4 \
  nodes.sampler.params.cfg=batched --warmup 0 --blocks 1 --report-block 0 --json > "$OUT/fd_w2.json" \
  2> "$OUT/fd_w2.err" || { echo "fd bench w2:"; tail -12 "$OUT/fd_w2.err"; }
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def lines(p):
    return [json.loads(x) for x in p.read_text().splitlines() if x.startswith("{")] if p.exists() else []
print(f"{'W2 (random weights)':28s} {'ms / CFG step':>14s} {'VAE 21f ms':>11s}")
for r in lines(out / "w2.jsonl"):
    if "error" in r:
        print(f"{r['w2']:28s} ERROR {r['error'][:70]}")
    elif "ms_per_cfg_step" in r:
        print(f"{r['w2']:28s} {r['ms_per_cfg_step']:14.1f} {'':>11s}  peak {r.get('peak_gib')} GiB")
    else:
        print(f"{r['w2']:28s} {'':>14s} {r['ms']:11.1f}")
for r in lines(out / "official_w2.jsonl"):
    if "per_step_cfg_ms" in r:
        print(f"{'official (2 forwards)':28s} {r['per_step_cfg_ms']:14.1f}")
    if "w2_vae_decode_21f_ms" in r:
        print(f"{'official VAE':28s} {'':>14s} {r['w2_vae_decode_21f_ms']:11.1f}")
p = out / "fd_w2.json"
if p.exists() and p.stat().st_size:
    rep = json.loads(p.read_text())
    b = rep["blocks"][0]
    print(f"fd bench wan21_t2v_1.3b (4 steps, batched, first run): sampler {b['nodes_ms'].get('sampler', 0):.0f} ms, "
          f"decoder {b['nodes_ms'].get('decoder', 0):.0f} ms, cold start {rep['cold_start_s']:.1f} s, "
          f"peak {rep['peak_mem_gib']:.1f} GiB")
PY
