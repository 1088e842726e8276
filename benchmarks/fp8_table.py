"""The short table benchmarks/device_fp8.sh prints last, from the files it wrote into one folder:
fp8_ops.jsonl, fd_*.json (fd bench --json), fp8_quality.jsonl. Missing files are skipped.

    python3 -m benchmarks.fp8_table OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import median


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip().startswith("{")]


def _f(x, fmt="{:.3f}") -> str:
    return "-" if x is None or x != x else fmt.format(x)


def ops(folder: Path) -> None:
    rows = _lines(folder / "fp8_ops.jsonl")
    if not rows:
        return
    print(f"{'op':9s} {'shape':14s} {'method':32s} {'ms':>7s} {'TF/s':>6s} {'+quant':>7s} {'+cquant':>7s} "
          f"{'err32':>7s} {'graph':>5s}")
    for r in rows:
        if "error" in r:
            print(f"{r['op']:9s} {r['shape']:14s} {r['method']:32s} ERROR {r['error'][:60]}")
            continue
        print(f"{r['op']:9s} {r['shape']:14s} {r['method']:32s} {_f(r.get('ms')):>7s} {_f(r.get('tflops'), '{:.0f}'):>6s} "
              f"{_f(r.get('ms_with_quant')):>7s} {_f(r.get('ms_with_compiled_quant')):>7s} "
              f"{_f(r.get('rel_err_vs_fp32'), '{:.4f}'):>7s} {str(r.get('graph_replay_ok', '')):>5s}")


def benches(folder: Path) -> None:
    files = sorted(folder.glob("fd_*.json"))
    if not files:
        return
    print(f"\n{'fd bench':18s} {'block5':>8s} {'steady':>8s} {'DiT':>7s} {'KV':>6s} {'dec':>6s} {'cold s':>7s} "
          f"{'peak GiB':>8s}")
    for path in files:
        try:
            rep = json.loads(path.read_text())
        except (ValueError, OSError):
            print(f"{path.stem:18s} (no report)")
            continue
        rb = rep.get("report_blocks") or {}
        b5 = rb[max(rb, key=int)] if rb else None
        st = rep.get("steady") or {}
        sp = st.get("parts_ms_median") or {}
        steady_blocks = [b for b in rep.get("blocks", []) if b["block"] in set(st.get("block_indices") or [])]
        dec = median(b["nodes_ms"].get("decoder", 0.0) for b in steady_blocks) if steady_blocks else None
        print(f"{path.stem:18s} {_f(b5 and b5['pipeline_ms'], '{:.1f}'):>8s} "
              f"{_f(st.get('pipeline_ms_median'), '{:.1f}'):>8s} {_f(sp.get('sampler.dit_ms'), '{:.1f}'):>7s} "
              f"{_f(sp.get('sampler.kv_ms'), '{:.1f}'):>6s} {_f(dec, '{:.1f}'):>6s} "
              f"{_f(rep.get('cold_start_s'), '{:.1f}'):>7s} {_f(rep.get('peak_mem_gib'), '{:.1f}'):>8s}")


def quality(folder: Path) -> None:
    rows = _lines(folder / "fp8_quality.jsonl")
    if not rows:
        return
    print(f"\n{'quality (random weights)':24s} {'tf err b0':>9s} {'tf err b5':>9s} {'PSNR dB':>8s} {'min':>6s} "
          f"{'lat err last':>12s}")
    for r in rows:
        tf = [k for k in r if k.startswith("tf_rel_err_block")]
        last = max(tf, key=lambda k: int(k.removeprefix("tf_rel_err_block"))) if tf else None
        print(f"{r['option']:24s} {_f(r.get('tf_rel_err_block0'), '{:.4f}'):>9s} "
              f"{_f(r.get(last) if last else None, '{:.4f}'):>9s} {_f(r.get('psnr_mean_db'), '{:.1f}'):>8s} "
              f"{_f(min(r['psnr_db']), '{:.1f}'):>6s} {_f(r['latent_rel_err'][-1], '{:.4f}'):>12s}")


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    ops(folder)
    benches(folder)
    quality(folder)


if __name__ == "__main__":
    main()
