#!/usr/bin/env bash
# Train the world_cpu world model on ONE GPU (issue 25): renderer -> autoencoder -> causal DiT, ~6.5 min of
# training inside a hard time budget (the script stops cleanly and saves), then a CPU check that the weights
# load and run through the engine (fd exec world_cpu) and a short table. Total ~7.5 min.
# Writes $OUT/world/{world_cpu.safetensors, config.json, MODEL_CARD.md, losses.jsonl} (~9 MB) and
# $OUT/{train.log, exec.log, world_cpu.mp4}. The lead copies $OUT/world/{world_cpu.safetensors, config.json,
# MODEL_CARD.md} into nodes/world/weights/ (and losses.jsonl next to them if wanted).
# Expects .whl carried (device_env.sh installs omegaconf from it; only the engine check needs it).
set -u
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/world"
BUDGET=${BUDGET:-390}      # EXTRA="--smoke" BUDGET=40: a CPU dry run of this script
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)
python3 examples/world_cpu/train.py --out "$OUT/world" --time-budget "$BUDGET" ${EXTRA:-} > "$OUT/train.log" 2>&1
echo "train rc=$? after $(( $(date +%s) - start )) s"; tail -4 "$OUT/train.log"
W="$OUT/world/world_cpu.safetensors"
if [ -f "$W" ]; then
  t0=$(date +%s)
  timeout 120 python3 -m flashdreams_cli.main exec world_cpu nodes.dit.params.checkpoint="$W" \
    nodes.decoder.params.checkpoint="$W" --quiet --out "$OUT/world_cpu.mp4" > "$OUT/exec.log" 2>&1
  echo "fd exec world_cpu (CPU, shipped spec, these weights) rc=$? in $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/exec.log"
fi
python3 - "$OUT/world" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
try:
    r = json.loads((out / "config.json").read_text())["training"]
except Exception as e:
    print("no config.json:", e); sys.exit(0)
ae, dit, ev = r.get("autoencoder", {}), r.get("dit", {}), r.get("eval", {})
size = (out / "world_cpu.safetensors").stat().st_size / 2**20
print(f"{'device':28} {'total s':>8} {'AE dB':>6} {'DiT steps':>9} {'loss0':>7} {'loss':>7} {'rollout dB':>10} {'MB':>5}")
print(f"{r.get('device', '?')[:28]:28} {r.get('total_seconds', 0):8.0f} {ae.get('recon_psnr_db', 0):6.2f} "
      f"{dit.get('steps', 0):9d} {dit.get('first_loss', 0):7.4f} {dit.get('final_loss_last100', 0):7.4f} "
      f"{ev.get('mean_rollout_psnr_db', 0):10.2f} {size:5.1f}")
for k, v in ev.get("rollout_psnr_db", {}).items():
    print(f"  {k:24} {v:6.2f} dB")
PY
