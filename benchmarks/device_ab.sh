#!/usr/bin/env bash
# One device call: fd bench W1 (TAEHV, window 21) on this tree and on an older tree (.baseline/old, e.g.
# `git archive <commit> | tar -x -C .baseline/old`), interleaved twice, so a change is judged on the same
# GPU in the same call. Expects .whl (omegaconf, antlr4) carried. Writes JSON into $OUT and prints a table.
set -u
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
W1="inputs.num_blocks=12 nodes.sampler.params.window_frames=21 --warmup 2 --blocks 10 --report-block 5 --json"
ROOT=$PWD
for run in new1 old1 new2 old2; do
  dir=$ROOT; commit=${FD_COMMIT_NEW:-new}
  case $run in old*) dir=$ROOT/.baseline/old; commit=${FD_COMMIT_OLD:-old};; esac
  (cd "$dir" && PYTHONPATH=/tmp/site:$dir FD_COMMIT=$commit python3 -m flashdreams_cli.main bench bench_self_forcing \
     nodes.decoder.type=taehv.decode $W1 > "$OUT/$run.json" 2> "$OUT/$run.err") || tail -20 "$OUT/$run.err"
done
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print(f"{'run':6} {'commit':10} {'block5 ms':>10} {'steady ms':>10} {'dit':>8} {'kv':>8} {'cold s':>7}  graphs")
for run in ("new1", "old1", "new2", "old2"):
    p = out / f"{run}.json"
    if not p.exists() or not p.read_text().strip():
        print(run, "no result"); continue
    r = json.loads(p.read_text())
    b5 = r["report_blocks"].get("5") or r["report_blocks"].get(5)
    parts = r["parts_ms_median"]
    print(f"{run:6} {str(r['env'].get('commit')):10} {b5['wall_ms']:10.1f} {r['block_ms_median']:10.1f} "
          f"{parts.get('sampler.dit_ms', 0):8.1f} {parts.get('sampler.kv_ms', 0):8.1f} {r['cold_start_s']:7.1f}  "
          f"{r['graphs'].get('sampler')}")
PY
