#!/usr/bin/env bash
# One device call on a multi-GPU kind (nvidia-h200-x2 / x4): W1 and a 14B causal block on 1 GPU, then with the
# DiT context-parallel over N GPUs (ring and Ulysses) under torchrun. Usage: NGPU=2 bash benchmarks/device_cp_multi.sh
set -u
source benchmarks/device_env.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; NGPU=${NGPU:-2}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
W1="inputs.num_blocks=12 nodes.sampler.params.window_frames=21 nodes.decoder.type=taehv.decode --warmup 2 --blocks 10 --report-block 5 --json"
B14="nodes.dit.params.preset=14b inputs.num_blocks=8 nodes.sampler.params.window_frames=21 nodes.decoder.type=taehv.decode --warmup 2 --blocks 4 --report-block 5 --json"
run1() { timeout 300 python3 -m flashdreams_cli bench bench_self_forcing "$@" 2>>"$OUT/err.log"; }
runN() { timeout 300 torchrun --nproc-per-node "$NGPU" -m flashdreams_cli bench bench_self_forcing "$@" 2>>"$OUT/err.log"; }
run1 $W1 > "$OUT/w1_1gpu.json"
runN $W1 nodes.dit.parallel.context=$NGPU > "$OUT/w1_${NGPU}gpu_ring.json"
runN $W1 nodes.dit.parallel.context=$NGPU nodes.dit.parallel.strategy=ulysses > "$OUT/w1_${NGPU}gpu_ulysses.json"
run1 $B14 > "$OUT/b14_1gpu.json"
runN $B14 nodes.dit.parallel.context=$NGPU > "$OUT/b14_${NGPU}gpu_ring.json"
python3 - "$OUT" <<'PY'
import json, os, sys
from statistics import median
o = sys.argv[1]
print(f"{'run':22s} {'blk5 ms':>9s} {'steady ms':>10s} {'n':>3s} {'DiT@5':>8s} {'peak GiB':>9s}  latent checksum")
for f in sorted(os.listdir(o)):
    if not f.endswith(".json"):
        continue
    try:
        r = json.load(open(os.path.join(o, f)))
    except Exception as e:
        print(f, "failed:", e); continue
    b = {x["block"]: x for x in r["blocks"]}
    st = [x["pipeline_ms"] for x in r["blocks"] if x["block"] >= 7 and not x["warmup"]]
    b5 = b.get(5, {})
    # steady = median over the timed blocks >= 7 (n of them; a figure for BENCHMARKS.md needs n >= 5)
    print(f"{f[:-5]:22s} {b5.get('pipeline_ms', float('nan')):9.1f} {median(st) if st else float('nan'):10.1f} {len(st):3d} "
          f"{b5.get('parts_ms', {}).get('sampler.dit_ms', float('nan')):8.1f} {r['peak_mem_gib'] or 0:9.1f}  "
          f"{r['final_latent_checksum'].get('sampler.latent')}")
PY
tail -5 "$OUT/err.log"
