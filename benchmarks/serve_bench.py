"""First-frame latency and steady FPS of a spec served by `fd serve` (in-process server, loopback client).

    python3 -m benchmarks.serve_bench bench_self_forcing nodes.decoder.type=taehv.decode --blocks 12

Warm-up (model load, compile, graph capture) happens before the server accepts a session, as
`fd serve` does. First-frame latency = from sending `start` to the first JPEG frame arriving;
steady FPS = frames per second over blocks >= 3 (arrival times at the client).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

from engine.spec import load_spec
from flashdreams_cli.serve.client import Client, Frame
from flashdreams_cli.serve.server import ServeConfig, Server


async def run(spec_name: str, overrides: list[str], blocks: int) -> dict:
    spec = load_spec(spec_name, overrides=overrides + [f"inputs.num_blocks={blocks}"])
    server = Server(spec, ServeConfig(port=0))
    t = time.perf_counter()
    await server.start(warm=True)
    await server._warmup_task
    warm_s = time.perf_counter() - t
    url = f"http://127.0.0.1:{server.port}"
    arrivals: list[tuple[float, int]] = []
    try:
        async with Client.connect(url) as c:
            t0 = time.perf_counter()
            prompt = "a red fox running through fresh snow" if "prompt" in spec.inputs else None   # world_cpu: none
            await c.start(prompt=prompt, seed=0, blocks=blocks)
            while True:
                item = await c.recv(timeout=120)
                if isinstance(item, Frame):
                    arrivals.append((time.perf_counter(), item.header.block))
                elif item.get("type") == "done":
                    break
                elif item.get("type") == "error":
                    raise RuntimeError(item["message"])
        metrics = server.metrics_snapshot()
    finally:
        await server.stop()
    steady = [a for a, b in arrivals if b >= 3]
    fps = (len(steady) - 1) / (steady[-1] - steady[0]) if len(steady) > 1 else None
    return {"spec": spec_name, "overrides": overrides, "blocks": blocks, "warmup_s": round(warm_s, 2),
            "first_frame_latency_ms": round((arrivals[0][0] - t0) * 1e3, 1), "frames": len(arrivals),
            "steady_fps": round(fps, 2) if fps else None, "server_metrics": metrics}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--blocks", type=int, default=12)
    a = ap.parse_args()
    print(json.dumps(asyncio.run(run(a.spec, a.overrides, a.blocks)), default=str))


if __name__ == "__main__":
    main()
