"""Drive a pipeline from Python: stream blocks, switch the prompt mid-rollout, read frames.

    python examples/stream_python_api.py            # uses the tiny CPU spec
"""
from __future__ import annotations

import sys

import engine


def main(spec: str = "tiny_self_forcing") -> None:
    pipe = engine.load(spec, overrides=["inputs.num_blocks=4"])
    pipe.load()
    with pipe.open_session(prompt="a red fox walking through snow") as session:
        for i in range(4):
            if i == 2:
                session.set_input("prompt", "the red fox starts running")   # KV cache kept, prompt re-encoded
            block = session.step()
            ms = sum(block.timings_ms.values())
            main_sink = pipe.plan.main_sink()
            print(f"block {block.block}: {ms:.0f} ms; nodes {', '.join(block.timings_ms)}; main sink {main_sink}")


if __name__ == "__main__":
    main(*sys.argv[1:])
