#!/usr/bin/env bash
# One device call: fd serve first-frame latency / steady FPS of the full-size Self-Forcing spec (random
# weights), and fd bench of the plain path vs the context-parallel path with a group of size 1.
set -u
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TAE="nodes.decoder.type=taehv.decode nodes.sampler.params.window_frames=21"
python3 -m benchmarks.serve_bench bench_self_forcing $TAE --blocks 12 --sessions 1 --no-engine > "$OUT/serve_taehv.json" 2> "$OUT/serve.err" \
  || tail -20 "$OUT/serve.err"
python3 -m benchmarks.serve_bench bench_self_forcing nodes.sampler.params.window_frames=21 --blocks 12 --sessions 1 --no-engine \
  > "$OUT/serve_wan.json" 2>> "$OUT/serve.err" || tail -20 "$OUT/serve.err"
B="inputs.num_blocks=12 --warmup 2 --blocks 10 --report-block 5 --json"
python3 -m flashdreams_cli.main bench bench_self_forcing $TAE $B > "$OUT/fd_plain.json" 2> "$OUT/b.err" || tail "$OUT/b.err"
python3 -m flashdreams_cli.main bench bench_self_forcing $TAE nodes.dit.parallel.context=1 $B > "$OUT/fd_cp1.json" \
  2>> "$OUT/b.err" || tail "$OUT/b.err"
python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
for f in ("serve_taehv", "serve_wan"):
    try:
        r = json.load(open(f"{o}/{f}.json"))
        print(f, "first frame", r["first_frame_latency_ms"], "ms; steady", r["steady_fps"], "fps; warm-up",
              r["warmup_s"], "s; block median", r["server_metrics"]["block_ms"]["median"], "ms")
    except Exception as e:
        print(f, "failed", e)
PY
python3 -m benchmarks.summarize_fd_bench "$OUT/fd_plain.json" "$OUT/fd_cp1.json"
