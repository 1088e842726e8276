#!/usr/bin/env bash
# One device call: FlashAttention-4 (CuTe DSL) against cuDNN at fd's attention shapes, its tests, and W1 through
# `fd bench` with attention flash4 vs cudnn (graphs replayed). Carry: .whl (omegaconf), .fa4b (FA4's wheels for
# Python 3.12). nvidia-cutlass-dsl-libs-cu13 (a 92 MB wheel; 62 MB as .tar.xz) is too
# big for one call's 64 MiB with the tree, so earlier calls on the same warm machine left it in /tmp/fa4blob as
# pieces (a `split` of the .tar.xz, each carried in one call and copied there: benchmarks/device_s5.sh).
# FA4_PROBE=0 skips the op-level probe and the attention tests. The cuDNN
# frontend (cuDNN FP8 attention) comes in .whl.
set -u
source benchmarks/device_env.sh
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGE=/tmp/fa4site
if [ ! -d "$STAGE/flash_attn" ]; then
  # one pip call: the three cutlass-dsl wheels share a top-level folder, which separate --target calls would clobber
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$STAGE" .fa4b/*.whl || exit 1
  cat /tmp/fa4blob/part.* | python3 -c "import tarfile,sys; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall(sys.argv[1])" \
    "$STAGE" || echo "no /tmp/fa4blob on this machine: FA4 will fail to import"
fi
# the cutlass package lives where nvidia_cutlass_dsl's .pth would put it (PYTHONPATH folders don't run .pth files)
export PYTHONPATH=$STAGE:$STAGE/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4cache
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
python3 -c "import flash_attn.cute, cudnn; print('flash_attn.cute', flash_attn.cute.__file__, 'cudnn', cudnn.backend_version())" \
  2>&1 | tail -3
if [[ "${FA4_PROBE:-1}" == 1 ]]; then  # op level, cold JIT cache then warm (a second process reads the kernels from disk)
  timeout 240 python3 -m benchmarks.attention_probe > "$OUT/probe.jsonl" 2> "$OUT/probe.err" || tail -20 "$OUT/probe.err"
  timeout 60 python3 -m benchmarks.attention_probe --backends flash4 --shapes w1_block5 > "$OUT/probe_warm.jsonl" \
    2>> "$OUT/probe.err" || tail -5 "$OUT/probe.err"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_attention_backends.py > "$OUT/pytest.txt" 2>&1
  tail -3 "$OUT/pytest.txt"
fi
W1="inputs.num_blocks=12 nodes.sampler.params.window_frames=21 --warmup 2 --blocks 10 --report-block 5 --json"
for be in ${FA4_W1_BACKENDS:-cudnn flash4}; do   # the cudnn run may come from another script in the same call
  timeout 200 python3 -m flashdreams_cli.main bench bench_self_forcing nodes.decoder.type=taehv.decode \
    nodes.dit.params.attention=$be $W1 > "$OUT/w1_$be.json" 2> "$OUT/w1_$be.err" || tail -20 "$OUT/w1_$be.err"
done
if [[ -n "${FA4_W2:-}" ]]; then   # W2 (bidirectional Wan 2.1 1.3B, 32,760 tokens): ms per CFG step, FA4 vs cuDNN
  timeout 240 python3 -m benchmarks.w2_steps --variants bf16_batched,bf16_batched_flash4 --decode "" --out "$OUT/w2.jsonl" \
    > "$OUT/w2.log" 2>&1 || tail -5 "$OUT/w2.log"
  grep -h '^{' "$OUT/w2.jsonl" | cut -c1-160
fi
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = [json.loads(l) for f in ("probe.jsonl", "probe_warm.jsonl") if (out / f).exists()
        for l in (out / f).read_text().splitlines() if l.strip()]
print(f"{'shape':10} {'backend':10} {'ms':>8} {'TFLOP/s':>8} {'rel err':>9} {'max abs':>8} {'1st call s':>10}")
for r in rows:
    if "shape" not in r:
        print(r); continue
    if "error" in r:
        print(f"{r['shape']:10} {r['backend']:10} ERROR {r['error'][:90]}"); continue
    print(f"{r['shape']:10} {r['backend']:10} {r.get('ms', 0):8.3f} {r.get('tflops', 0):8.1f} {r['rel_err']:9.2e} "
          f"{r['max_abs_err']:8.4f} {r['first_call_s']:10.2f}")
for be in ("cudnn", "flash4"):
    p = out / f"w1_{be}.json"
    try:
        r = json.loads(p.read_text())
    except Exception:
        print(f"w1 {be}: no result"); continue
    b5 = r["report_blocks"].get("5") or {}
    print(f"w1 {be:7} block5 {b5.get('wall_ms', float('nan')):7.1f} ms  steady {r['block_ms_median']:7.1f} ms  "
          f"dit {r['parts_ms_median'].get('sampler.dit_ms', 0):6.1f}  kv {r['parts_ms_median'].get('sampler.kv_ms', 0):6.1f}"
          f"  cold {r['cold_start_s']:5.1f} s  graphs {r['graphs'].get('sampler')}")
PY
