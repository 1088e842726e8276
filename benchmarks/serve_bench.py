"""fd serve with several sessions at once: aggregate frames/s and per-session latency (issue 22).

    python3 -m benchmarks.serve_bench bench_self_forcing nodes.decoder.type=taehv.decode --sessions 1 2 4 8
    python3 -m benchmarks.serve_bench --dry          # tiny_self_forcing on the CPU: checks the script runs

One in-process server (warm-up - model load, graph capture - happens before it accepts sessions, as
`fd serve` does), loopback clients. For each session count N:
- served, ``asap``: N clients start at once and stream ``--blocks`` blocks as fast as the server goes:
  aggregate frames/s (all frames / wall time from the first start to the last frame, and the sum of the
  sessions' steady rates from block 1 on), per session first-frame latency (start sent -> first JPEG
  arrived), steady fps and the server's block ms (one batched forward serves all N);
- served, ``realtime`` (``--realtime N...``): N clients paced at the spec's fps: does each hold it?
- engine: ``step_together`` of N sessions without HTTP or JPEG, timed with CUDA events (median round
  over blocks >= 2): what batching buys the GPU alone.
Prints one JSON document; ``--table`` prints a short table after it (to stderr).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

from engine.spec import load_spec
from flashdreams_cli.serve.client import Client, Frame
from flashdreams_cli.serve.server import ServeConfig, Server

PROMPTS = ["a red fox running through fresh snow", "a lighthouse on a cliff at dusk, waves crashing",
           "a busy night market with lanterns", "a paper boat drifting down a rainy street",
           "a hot air balloon over green hills", "an astronaut walking on a red desert",
           "a koi pond seen from above, ripples", "a steam train crossing a stone bridge"]


async def _client(url: str, i: int, blocks: int, pace: str, prompted: bool = True) -> dict:
    async with Client.connect(url) as c:
        t0 = time.perf_counter()
        prompt = PROMPTS[i % len(PROMPTS)] if prompted else None      # world_cpu has no prompt input
        await c.start(prompt=prompt, seed=i, blocks=blocks, pace=pace)
        arrivals, block_ms = [], []
        while True:
            item = await c.recv(timeout=300)
            if isinstance(item, Frame):
                arrivals.append((time.perf_counter(), item.header.block))
            elif item.get("type") == "block":
                block_ms.append(item["ms"])
            elif item.get("type") == "done":
                break
            elif item.get("type") == "error":
                raise RuntimeError(item["message"])
    # steady rate from block 1 on: frames of blocks 1..K-2 over the time between block 1's and block K-1's first
    # frame arriving (block 0 carries the start-up; frames of a block arrive together)
    firsts, counts = {}, {}
    for t, b in arrivals:
        firsts.setdefault(b, t)
        counts[b] = counts.get(b, 0) + 1
    late = sorted(b for b in firsts if b >= 1)
    fps = None
    if len(late) >= 2 and firsts[late[-1]] > firsts[late[0]]:
        fps = sum(counts[b] for b in late[:-1]) / (firsts[late[-1]] - firsts[late[0]])
    return {"t0": t0, "first_frame_ms": round((arrivals[0][0] - t0) * 1e3, 1), "frames": len(arrivals),
            "last": arrivals[-1][0], "steady_fps": round(fps, 2) if fps else None,
            "block_ms_median": round(statistics.median(block_ms), 1) if block_ms else None}


async def served_round(server: Server, n: int, blocks: int, pace: str) -> dict:
    url = f"http://127.0.0.1:{server.port}"
    before = dict(server.manager.replicas[0].batch_sizes)
    prompted = "prompt" in server.source.spec.inputs
    sessions = await asyncio.gather(*(_client(url, i, blocks, pace, prompted) for i in range(n)),
                                    return_exceptions=True)
    errors = [s for s in sessions if isinstance(s, BaseException)]
    if errors:                      # every client of the round has ended: the next round starts clean
        raise errors[0]
    after = server.manager.replicas[0].batch_sizes
    start, end = min(s["t0"] for s in sessions), max(s["last"] for s in sessions)
    steady = [s["steady_fps"] for s in sessions if s["steady_fps"]]
    mem = server.manager.replicas[0].stats()
    return {"sessions": n, "pace": pace, "blocks": blocks,
            "aggregate_fps_wall": round(sum(s["frames"] for s in sessions) / (end - start), 2),
            "aggregate_fps_steady": round(sum(steady), 2) if len(steady) == n else None,
            "min_session_fps": min(steady) if steady else None,
            "first_frame_ms_max": max(s["first_frame_ms"] for s in sessions),
            "first_frame_ms_median": statistics.median(s["first_frame_ms"] for s in sessions),
            "block_ms_median": statistics.median(s["block_ms_median"] for s in sessions if s["block_ms_median"]),
            "batch_sizes": {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)},
            "gpu_memory_reserved_bytes": mem.get("gpu_memory_reserved_bytes"),
            "per_session": [{k: v for k, v in s.items() if k not in ("t0", "last")} for s in sessions]}


def engine_round(pipeline, n: int, blocks: int, frames_node: str, frames_port: str) -> dict:
    """``step_together`` of n sessions, rounds timed with CUDA events (perf counters on CPU)."""
    import torch

    from engine.session import step_together
    cuda = torch.cuda.is_available()
    prompted = "prompt" in pipeline.plan.spec.inputs                   # world_cpu has no prompt input

    def open_session(i):
        return pipeline.open_session(seed=i, **({"prompt": PROMPTS[i % len(PROMPTS)]} if prompted else {}))
    sessions = [open_session(i) for i in range(n)]
    rounds, frames, first = [], 0, []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(blocks):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
            t = time.perf_counter()
            results = step_together(sessions)
            if cuda:
                b.record()
                b.synchronize()
                rounds.append(a.elapsed_time(b))
            else:
                rounds.append((time.perf_counter() - t) * 1e3)
            pixels = results[0].outputs[frames_node][frames_port]
            frames = int(pixels.shape[1])
            first.append(pixels.float().cpu())
    finally:
        for s in sessions:
            s.close()
    # session 0 again, alone (the lone path): how far is its batched output from it on this device?
    diff = None
    if n > 1:
        alone = open_session(0)
        try:
            diffs = []
            for batched in first:                 # block by block
                lone = alone.step().outputs[frames_node][frames_port].float().cpu()
                diffs.append(float((lone - batched).abs().max()))
            diff = max(diffs)
        finally:
            alone.close()
    steady = rounds[2:] or rounds
    ms = statistics.median(steady)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return {"sessions": n, "round_ms_median": round(ms, 2), "round_ms": [round(r, 2) for r in rounds],
            "frames_per_session_block": frames, "aggregate_fps": round(n * frames / (ms / 1e3), 2),
            "per_session_fps": round(frames / (ms / 1e3), 2), "max_memory_allocated_bytes": peak,
            "session0_max_abs_diff_vs_alone": diff}


def _save(out: dict, path: str | None) -> None:
    """Write what is measured so far (a run cut short by its time limit still leaves its rounds)."""
    if path:
        from engine.files import AtomicPath
        target = AtomicPath(path)
        target.tmp.write_text(json.dumps(out, default=str))
        target.commit()


async def run(spec_name: str, overrides: list[str], blocks: int, counts: list[int], realtime: list[int],
              engine: bool, save: str | None = None) -> dict:
    spec = load_spec(spec_name, overrides=overrides + [f"inputs.num_blocks={blocks}"])
    server = Server(spec, ServeConfig(port=0, max_batch=max(counts + realtime + [1]), max_queue=64))
    t = time.perf_counter()
    await server.start(warm=True)
    await server._warmup_task
    warm_s = time.perf_counter() - t
    out = {"spec": spec_name, "overrides": overrides, "blocks": blocks, "fps_spec": server.source.fps,
           "warmup_s": round(warm_s, 2), "served": [], "realtime": [], "engine": []}
    try:
        for n in counts:
            try:
                out["served"].append(await served_round(server, n, blocks, "asap"))
            except Exception as e:     # e.g. out of memory at the largest N: keep the smaller ones
                out["served"].append({"sessions": n, "pace": "asap", "error": f"{type(e).__name__}: {e}"})
            _save(out, save)
        for n in realtime:
            try:
                out["realtime"].append(await served_round(server, n, blocks, "realtime"))
            except Exception as e:
                out["realtime"].append({"sessions": n, "pace": "realtime", "error": f"{type(e).__name__}: {e}"})
            _save(out, save)
        out["server_metrics"] = server.metrics_snapshot()
    finally:
        await server.stop()
    if engine:
        pipe = server.manager.replicas[0].pipeline
        ref = server.source.frames
        for n in counts:
            try:
                out["engine"].append(engine_round(pipe, n, blocks, ref.node, ref.port))
            except Exception as e:
                out["engine"].append({"sessions": n, "error": f"{type(e).__name__}: {e}"})
            _save(out, save)
    one = next((r for r in out["served"] if r["sessions"] == 1 and "error" not in r), None)
    if one is not None:   # the single-session fields device_serve_cp.sh reads
        out["first_frame_latency_ms"] = one["first_frame_ms_max"]
        out["steady_fps"] = one["min_session_fps"]
    return out


def table(r: dict) -> str:
    lines = [f"{r['spec']} {' '.join(r['overrides'])}: warm-up {r['warmup_s']} s, spec fps {r['fps_spec']}",
             "mode      N  agg fps(wall) agg fps(steady) min sess fps  first frame max ms  block ms  engine agg fps"]
    eng = {e["sessions"]: e for e in r["engine"]}
    for s in r["served"] + r["realtime"]:
        if "error" in s:
            lines.append(f"{s['pace']:8s} {s['sessions']:2d}  error: {s['error'][:80]}")
            continue
        e = eng.get(s["sessions"], {}) if s["pace"] == "asap" else {}
        lines.append(f"{s['pace']:8s} {s['sessions']:2d}  {s['aggregate_fps_wall']:13} {str(s['aggregate_fps_steady']):>15} "
                     f"{str(s['min_session_fps']):>12} {s['first_frame_ms_max']:19} {s['block_ms_median']:9} "
                     f"{str(e.get('aggregate_fps', e.get('error', '-'))):>15}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec", nargs="?", default="bench_self_forcing")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--blocks", type=int, default=6, help="blocks per session (the spec's num_blocks is set to it)")
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--realtime", type=int, nargs="*", default=[], help="session counts to run paced at the fps")
    ap.add_argument("--no-engine", action="store_true", help="skip the engine-only (no HTTP/JPEG) rounds")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--out", help="also write the JSON here after every round (partial results survive a timeout)")
    ap.add_argument("--dry", action="store_true", help="tiny_self_forcing on the CPU, 1 and 2 sessions, 3 blocks")
    a = ap.parse_args()
    if a.dry:
        a.spec, a.overrides, a.blocks, a.sessions, a.realtime = "tiny_self_forcing", [], 3, [1, 2], [2]
    r = asyncio.run(run(a.spec, a.overrides, a.blocks, a.sessions, a.realtime, not a.no_engine, a.out))
    _save(r, a.out)
    print(json.dumps(r, default=str))
    if a.table:
        print(table(r), file=sys.stderr)


if __name__ == "__main__":
    main()
