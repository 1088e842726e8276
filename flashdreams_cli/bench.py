"""`fd bench`: per-block and per-node latency after warmup, cold start, peak memory, graph replay.

On CUDA, node times come from CUDA events (no sync inside a block); the block
time is wall time between synchronisations around the block. Medians over the
measured blocks; the environment (GPU, torch, cuDNN, commit) is recorded.
``steady`` is the median over the timed blocks from ``--steady-from`` on, with their
count: a steady figure needs at least 5 of them (a warning says when it has fewer).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from statistics import median


def add_parser(sub, spec_args) -> None:
    p = sub.add_parser("bench", help="time a spec: per-block and per-node latency (CUDA events after warmup)")
    spec_args(p)
    p.add_argument("--warmup", type=int, default=2, help="untimed blocks first (graphs get captured here)")
    p.add_argument("--blocks", type=int, default=8, help="timed blocks after warmup")
    p.add_argument("--report-block", type=int, action="append", default=[],
                   help="also report this block index alone (e.g. 5)")
    p.add_argument("--steady-from", type=int, default=7,
                   help="first block of the steady state (W1: 7, once the 21-frame window is full)")
    p.add_argument("--with-sinks", action="store_true",
                   help="also run the spec's sinks (file encoding is CPU work outside the model pipeline)")


def environment() -> dict:
    import torch
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": "cpu"}
    if torch.cuda.is_available():
        env.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    # a copied tree (device runs, or an old tree beside the new one) says which commit it is through FD_COMMIT
    env["commit"] = os.environ.get("FD_COMMIT") or env["commit"]
    return env


def _sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_bench(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from engine.runner import SINKS_ALL, SINKS_NONE, open_pipeline

    # under torchrun every rank runs the pipeline and rank 0 reports; without --with-sinks the model
    # pipeline is timed, not the MP4 encoder
    pipe = open_pipeline(args.spec, args.overrides, args.set_files, sinks=SINKS_ALL if args.with_sinks else SINKS_NONE)
    plan, rank, world_size = pipe.plan, pipe.rank, pipe.plan.world_size
    t0 = time.perf_counter()
    pipe.load()
    _sync()
    load_s = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rows = []
    with pipe.open_session() as session:
        first_block_s = None
        for i in range(args.warmup + args.blocks):
            _sync()
            t = time.perf_counter()
            r = session.step()
            _sync()
            wall = (time.perf_counter() - t) * 1e3
            if i == 0:
                first_block_s = wall / 1e3
            rows.append({"block": r.block, "wall_ms": wall, "nodes_ms": r.timings_ms,
                         "pipeline_ms": sum(v for n, v in r.timings_ms.items() if not plan.nodes[n].is_sink
                                            and plan.nodes[n].phase == "block"),
                         "parts_ms": _breakdowns(pipe), "warmup": i < args.warmup, "graphs": _graph_status(pipe)})
    timed = [r for r in rows if not r["warmup"]]
    per_node = {n: median(r["nodes_ms"][n] for r in timed if n in r["nodes_ms"])
                for n in plan.block_nodes if any(n in r["nodes_ms"] for r in timed)}
    part_names = sorted({k for r in timed for k in r["parts_ms"]})
    per_part = {k: median(r["parts_ms"][k] for r in timed if k in r["parts_ms"]) for k in part_names}
    report = {"spec": plan.spec.file, "env": environment(), "load_s": load_s,
              "cold_start_s": load_s + (first_block_s or 0.0), "first_block_s": first_block_s,
              "block_ms_median": median(r["wall_ms"] for r in timed) if timed else None,
              "pipeline_ms_median": median(r["pipeline_ms"] for r in timed) if timed else None,
              "node_ms_median": per_node, "parts_ms_median": per_part, "blocks": rows,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
              "graphs": _graph_status(pipe), "attention": _attention_backends(pipe)}
    report["steady"] = _steady(timed, args.steady_from)
    if report["steady"]["blocks"] < STEADY_MIN_BLOCKS and rank == 0:
        print(f"warning: only {report['steady']['blocks']} timed blocks from block {args.steady_from} on; a steady "
              f"figure needs {STEADY_MIN_BLOCKS} (raise --blocks)", file=sys.stderr)
    report["report_blocks"] = {b: next((r for r in rows if r["block"] == b), None) for b in args.report_block}
    report["world_size"] = world_size
    report["final_latent_checksum"] = _latent_checksum(plan, session)
    if rank != 0:
        return 0
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    table = Table("node", "median ms", "graph")
    for n, ms in per_node.items():
        table.add_row(n, f"{ms:.2f}", report["graphs"].get(n, "eager"))
    for k, ms in per_part.items():
        table.add_row(f"  {k}", f"{ms:.2f}", "")
    table.add_row("[bold]block nodes (CUDA events)[/]", f"{report['pipeline_ms_median']:.2f}", "")
    table.add_row("[bold]block (wall)[/]", f"{report['block_ms_median']:.2f}", "")
    st = report["steady"]
    if st["blocks"]:
        table.add_row(f"[bold]steady: blocks >= {st['from_block']} (median of {st['blocks']})[/]",
                      f"{st['pipeline_ms_median']:.2f}", "")
    c = Console()
    c.print(table)
    c.print(f"load {load_s:.2f} s, cold start to first block {report['cold_start_s']:.2f} s, "
            f"peak {report['peak_mem_gib'] or 0:.2f} GiB, attention {report['attention']}, env {report['env']}")
    return 0


STEADY_MIN_BLOCKS = 5


def _steady(timed: list[dict], from_block: int) -> dict:
    """Medians over the timed blocks from ``from_block`` on, with how many there were."""
    rows = [r for r in timed if r["block"] >= from_block]
    out = {"from_block": from_block, "blocks": len(rows), "block_indices": [r["block"] for r in rows],
           "pipeline_ms_median": None, "wall_ms_median": None, "parts_ms_median": {}}
    if rows:
        out["pipeline_ms_median"] = median(r["pipeline_ms"] for r in rows)
        out["wall_ms_median"] = median(r["wall_ms"] for r in rows)
        names = sorted({k for r in rows for k in r["parts_ms"]})
        out["parts_ms_median"] = {k: median(r["parts_ms"][k] for r in rows if k in r["parts_ms"]) for k in names}
    return out


def _latent_checksum(plan, session) -> dict:
    """Sum and abs-sum of each LATENT output of the last block: compares runs (1 vs N GPUs) cheaply."""
    out = {}
    for n in plan.block_nodes:
        for port, v in session.values.get(n, {}).items():
            if hasattr(v, "float") and getattr(v, "ndim", 0) == 5:
                f = v.float()
                out[f"{n}.{port}"] = [float(f.sum()), float(f.abs().sum())]
    return out


def _breakdowns(pipe) -> dict:
    """Sub-node timings a node reports for its last block (e.g. the AR sampler's DiT steps vs KV pass)."""
    out = {}
    for n, node in pipe.nodes.items():
        parts = getattr(node, "last_breakdown_ms", None)
        if callable(parts):
            out.update({f"{n}.{k}": v for k, v in (parts() or {}).items()})
    return out


def _attention_backends(pipe) -> dict:
    """Which attention backend each model node ran (``auto`` resolved), so a number says what made it."""
    out = {}
    for n, node in pipe.nodes.items():
        in_use = getattr(node, "attention_in_use", None)
        if callable(in_use) and in_use() is not None:
            out[n] = in_use()
    return out


def _graph_status(pipe) -> dict:
    out = {}
    for n, node in pipe.nodes.items():
        status = getattr(node, "graph_status", None)
        out[n] = status() if callable(status) else ("captured" if node.ctx.capture else "eager")
    return out
