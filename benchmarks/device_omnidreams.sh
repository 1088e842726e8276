#!/usr/bin/env bash
# One device call (one H100, ~2-3 min): OmniDreams single view at full size with random weights in bf16
# (specs/bench_omnidreams.yaml: the released 2B shape, 1280x704, 8-frame chunks = 2 latent frames, 2 steps +
# the t=128 KV re-encode, 6-frame window, LightTAE-shaped decoder) through `fd bench`: ms per chunk split into
# DiT (both denoising steps) / KV re-encode (the context pass) / decode, and peak memory. Then `fd plan` of the
# same spec, to set the projection next to the measured peak.
# DRY=1 runs the same commands on the CPU at a tiny size (checks the script, not the numbers).
# Writes into $OUT: omnidreams.json (fd bench --json), omnidreams.err, plan.json; prints a short table last.
set -u
if [ "${DRY:-0}" = 1 ]; then
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; PY=python
  W=32; OV="nodes.dit.params.model_channels=48 nodes.dit.params.num_blocks=2 nodes.dit.params.num_heads=3
    nodes.dit.params.crossattn_emb_channels=24 nodes.dit.params.crossattn_proj_in_channels=32
    nodes.dit.params.adaln_lora_dim=8 nodes.dit.params.text_len=16 nodes.text.params.width=32
    nodes.sampler.params.latent_height=8 nodes.sampler.params.latent_width=12 nodes.hdmap.params.height=8
    nodes.hdmap.params.width=12 nodes.decoder.params.channels=[32,16,16,16] nodes.dit.params.dtype=fp32
    nodes.decoder.params.dtype=fp32 nodes.text.device=cpu nodes.hdmap.device=cpu nodes.dit.device=cpu
    nodes.sampler.device=cpu nodes.decoder.device=cpu"; L=16; B="--warmup 1 --blocks 3 --report-block 3 --json"
else
  source benchmarks/device_env.sh; PY=python3
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,temperature.gpu --format=csv,noheader
  W=100352; OV=""; L=512; B="--warmup 4 --blocks 12 --report-block 8 --json"
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TEXT=/tmp/omnidreams_bench_text.safetensors
$PY - "$TEXT" "$L" "$W" <<'PYEOF' || exit 1
import sys, torch
from safetensors.torch import save_file
path, L, W = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
save_file({"embeds": torch.randn(L, W, generator=g).to(torch.bfloat16)}, path)   # random Reason1-shaped prompt
PYEOF
$PY -m flashdreams_cli.main plan bench_omnidreams inputs.text=$TEXT $OV --device h100 --json > "$OUT/plan.json" \
  2> "$OUT/plan.err" || tail -5 "$OUT/plan.err"
$PY -m flashdreams_cli.main bench bench_omnidreams inputs.text=$TEXT $OV $B > "$OUT/omnidreams.json" \
  2> "$OUT/omnidreams.err" || { tail -30 "$OUT/omnidreams.err"; exit 1; }
$PY - "$OUT/omnidreams.json" "$OUT/plan.json" <<'PYEOF'
import json, sys
from statistics import median
rep = json.load(open(sys.argv[1]))
try:
    plan = json.load(open(sys.argv[2]))
    proj = max(plan["peaks"].values()) / 2**30
except (OSError, ValueError, KeyError):
    proj = float("nan")
rows = [r for r in rep["blocks"] if r["block"] >= 4] or rep["blocks"]
def med(f):
    return median(f(r) for r in rows)
dit = med(lambda r: r["parts_ms"].get("sampler.dit_ms", 0.0))
kv = med(lambda r: r["parts_ms"].get("sampler.kv_ms", 0.0))
dec = med(lambda r: r["nodes_ms"].get("decoder", 0.0))
tot = med(lambda r: r["pipeline_ms"])
print(f"device {rep['env'].get('device')}  blocks {[r['block'] for r in rows]}  graphs {rows[-1]['graphs']}")
print(f"{'ms/chunk (median)':18s} {'DiT':>7s} {'KV':>7s} {'decode':>7s} {'total':>7s} {'fps':>6s} {'peak GiB':>9s} {'plan GiB':>9s}")
print(f"{'omnidreams_sv bf16':18s} {dit:7.1f} {kv:7.1f} {dec:7.1f} {tot:7.1f} {8000 / tot:6.1f} "
      f"{rep['peak_mem_gib'] or 0:9.2f} {proj:9.2f}")
PYEOF
