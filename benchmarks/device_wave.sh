#!/usr/bin/env bash
# One device call (one H200) after the model-seam wave: W1 fd bench (TAEHV, window 21) on this tree, the memory
# plan's projections (fd plan) next to the measured peaks, and causal Wan 2.2 A14B at full size (random weights,
# TAEHV decoder) from specs/bench_causal_wan22.yaml. Expects .whl carried. Writes JSON into $OUT, prints a table.
set -u
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,temperature.gpu --format=csv,noheader
W1="inputs.num_blocks=12 nodes.sampler.params.window_frames=21"
python3 -m flashdreams_cli.main plan bench_self_forcing nodes.decoder.type=taehv.decode $W1 --json \
  > "$OUT/plan_w1.json" 2> "$OUT/plan_w1.err" || tail -5 "$OUT/plan_w1.err"
python3 -m flashdreams_cli.main bench bench_self_forcing nodes.decoder.type=taehv.decode $W1 --warmup 2 --blocks 10 \
  --report-block 5 --json > "$OUT/w1.json" 2> "$OUT/w1.err" || tail -20 "$OUT/w1.err"
MEM_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "${MEM_MIB:-0}" -lt 120000 ]; then echo "wan22: skipped, ${MEM_MIB} MiB on this GPU (needs ~112 GB: an H200)"; fi
[ "${MEM_MIB:-0}" -ge 120000 ] && python3 -m flashdreams_cli.main plan bench_causal_wan22 nodes.decoder.type=taehv.decode --json \
  > "$OUT/plan_wan22.json" 2> "$OUT/plan_wan22.err" || tail -5 "$OUT/plan_wan22.err"
[ "${MEM_MIB:-0}" -ge 120000 ] && python3 -m flashdreams_cli.main bench bench_causal_wan22 nodes.decoder.type=taehv.decode --warmup 2 --blocks 6 \
  --report-block 5 --json > "$OUT/wan22.json" 2> "$OUT/wan22.err" || tail -20 "$OUT/wan22.err"
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def load(n):
    p = out / n
    try:
        return json.loads(p.read_text())
    except Exception:
        return None
print(f"{'run':6} {'block5 ms':>10} {'steady ms':>10} {'dit':>8} {'kv':>8} {'decode':>8} {'peak GiB':>9} "
      f"{'plan GiB':>9} {'cold s':>7}  graphs")
for run, plan in (("w1", "plan_w1.json"), ("wan22", "plan_wan22.json")):
    r, pl = load(f"{run}.json"), load(plan)
    if r is None:
        print(run, "no result"); continue
    b5 = r["report_blocks"].get("5") or r["report_blocks"].get(5) or {}
    parts, nodes = r["parts_ms_median"], r["node_ms_median"]
    proj = None
    if pl and pl.get("peaks"):
        proj = max(v for k, v in pl["peaks"].items() if k.startswith("cuda")) / 2**30
    print(f"{run:6} {b5.get('wall_ms', float('nan')):10.1f} {r['block_ms_median']:10.1f} "
          f"{parts.get('sampler.dit_ms', 0):8.1f} {parts.get('sampler.kv_ms', 0):8.1f} {nodes.get('decoder', 0):8.1f} "
          f"{r['peak_mem_gib'] or 0:9.2f} {proj if proj is not None else float('nan'):9.2f} {r['cold_start_s']:7.1f}  "
          f"{r['graphs'].get('sampler')}")
PY
