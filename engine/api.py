"""The Python API that the CLI, the server and the tests all use.

    import engine
    pipe = engine.load("self_forcing", overrides=["inputs.num_blocks=4"])   # parse, validate, plan
    pipe.load()                                                               # weights
    with pipe.open_session(prompt="a fox in the snow") as session:
        for block in session.stream():
            frames = block.outputs["decoder"]["pixels"]
        session.set_input("prompt", "the fox starts running")                 # prompt switch, KV cache kept
        session.step()
"""
from __future__ import annotations

from pathlib import Path

from .plan import Plan, make_plan
from .registry import Registry
from .runner import World, open_pipeline
from .session import Pipeline
from .spec import Spec, load_spec


def load_plan(spec: str | Path | Spec, overrides: list[str] = (), set_files: list[str] = (),
              registry: Registry | None = None, world_size: int = 1, cuda_devices: int | None = None,
              check_devices: bool = True) -> Plan:
    """Parse (unless given a Spec), validate and plan. Raises ``SpecErrors`` listing every problem found."""
    if not isinstance(spec, Spec):
        spec = load_spec(spec, overrides=list(overrides), set_files=list(set_files))
    return make_plan(spec, registry or Registry.default(), world_size=world_size, cuda_devices=cuda_devices,
                     check_devices=check_devices)


def load(spec: str | Path | Spec, overrides: list[str] = (), set_files: list[str] = (),
         registry: Registry | None = None, world_size: int = 1, rank: int = 0) -> Pipeline:
    """A pipeline ready to ``load()`` weights and open sessions (the same road the CLI takes)."""
    return open_pipeline(spec, overrides, set_files, registry=registry, world=World(world_size, rank))
