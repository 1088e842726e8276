"""Print a short table from `fd bench --json` reports and the official harness's JSON lines.

    python3 -m benchmarks.summarize_fd_bench fd_taehv.json fd_wan.json --official official.jsonl
"""
from __future__ import annotations

import argparse
import json
from statistics import median


def block_row(report: dict, block: int) -> dict | None:
    return next((r for r in report["blocks"] if r["block"] == block), None)


def parts(row: dict) -> tuple[float, float, float, float]:
    p, n = row["parts_ms"], row["nodes_ms"]
    dit, kv = p.get("sampler.dit_ms", 0.0), p.get("sampler.kv_ms", 0.0)
    dec = n.get("decoder", 0.0)
    return dit, kv, dec, row["pipeline_ms"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--official", help="JSON lines of shared/baselines/official_selfforcing_bench.py")
    args = ap.parse_args()
    print(f"{'run':28s} {'block':>6s} {'DiT':>8s} {'KV':>7s} {'decode':>7s} {'total':>8s}  graphs")
    totals = {}
    for path in args.reports:
        rep = json.load(open(path))
        name = path.rsplit("/", 1)[-1].removesuffix(".json")
        for b in (5,):
            r = block_row(rep, b)
            if r:
                d, k, c, t = parts(r)
                totals[(name, "block5")] = t
                print(f"{name:28s} {b:6d} {d:8.1f} {k:7.1f} {c:7.1f} {t:8.1f}  {r['graphs'].get('sampler')}")
        steady = [r for r in rep["blocks"] if r["block"] >= 7]
        if steady:
            cols = list(zip(*(parts(r) for r in steady)))
            d, k, c, t = (median(x) for x in cols)
            totals[(name, "steady")] = t
            print(f"{name:28s} {'>=7':>6s} {d:8.1f} {k:7.1f} {c:7.1f} {t:8.1f}  (median of {len(steady)})")
        print(f"{'':28s} cold start {rep['cold_start_s']:.1f} s (load {rep['load_s']:.1f} s), peak "
              f"{rep['peak_mem_gib'] or 0:.1f} GiB, {rep['env'].get('device')}")
    if args.official:
        rows = [json.loads(x) for x in open(args.official) if x.strip().startswith("{")]
        rows = [r for r in rows if "block" in r and "total_ms" in r]
        b5 = next((r for r in rows if r["block"] == 5), None)
        if b5:
            print(f"{'official (Wan VAE)':28s} {5:6d} {b5['dit_ms']:8.1f} {b5['kv_ms']:7.1f} {b5['vae_ms']:7.1f} "
                  f"{b5['total_ms']:8.1f}")
            for (name, which), t in totals.items():
                if which == "block5" and "wan" in name:
                    print(f"ratio official / {name} at block 5: {b5['total_ms'] / t:.2f}x")


if __name__ == "__main__":
    main()
