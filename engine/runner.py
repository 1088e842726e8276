"""One road from a spec reference to a running pipeline, taken by every front end.

``fd exec``, ``fd bench``, ``fd serve``, ``fd viz --run`` and the Python API differ only in
which nodes they keep (all, no sinks, the streamed frames' ancestors) and where the main
sink writes; reading the spec, joining torch.distributed under a launcher, planning and
building the pipeline for this rank happen here, once.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import FdError
from .plan import Plan, make_plan
from .plan import main_sink as plan_main_sink
from .registry import Registry
from .session import Pipeline
from .spec import Spec, load_spec, parse_ref

SINKS_ALL, SINKS_NONE = "all", "none"


@dataclass(frozen=True)
class World:
    """This process's place in a torch.distributed launch (size 1 without one)."""
    size: int = 1
    rank: int = 0

    @classmethod
    def from_env(cls, join: bool = True) -> "World":
        """RANK/WORLD_SIZE as torchrun and ``fd exec --nproc`` set them; joins the process group when > 1."""
        world = cls(int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)))
        if join and world.size > 1:
            from .parallel.groups import init_distributed
            init_distributed()
        return world


def main_sink(spec: Spec, registry: Registry) -> str | None:
    """The main sink (engine.plan.main_sink's rule) of a spec not planned yet."""
    return plan_main_sink(spec, lambda n: registry.get(spec.nodes[n].type))


def read_spec(ref: str | Path | Spec, overrides: list[str] = (), set_files: list[str] = (), *,
              out: str | None = None, registry: Registry | None = None) -> Spec:
    """The spec with overrides applied; ``out`` becomes an override of the main sink's ``path``."""
    if isinstance(ref, Spec):
        if out:
            raise FdError(f"{ref.file}: `out` needs a spec reference, not a parsed Spec")
        return ref
    spec = load_spec(ref, list(overrides), list(set_files))
    if out:
        if not Path(out).expanduser().parent.is_dir():   # a typo'd folder is not created behind the user's back
            raise FdError(f"--out {out}: the folder {Path(out).expanduser().parent} does not exist")
        main = main_sink(spec, registry or Registry.default())
        if main is None:
            raise FdError(f"{spec.file}: --out given but the spec has no sink")
        spec = load_spec(ref, list(overrides) + [f"sinks.{main}.params.path={out}"], list(set_files))
    return spec


def without_sinks(spec: Spec) -> Spec:
    """The model pipeline alone (``fd bench`` times it without file encoding)."""
    return dataclasses.replace(spec, nodes={n: ns for n, ns in spec.nodes.items() if not ns.is_sink})


def ancestors(spec: Spec, node: str) -> Spec:
    """``node`` and every node it reads from (``fd serve`` keeps what produces the streamed frames)."""
    keep, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in keep or n not in spec.nodes:
            continue
        keep.add(n)
        wires = spec.nodes[n].wires if isinstance(spec.nodes[n].wires, dict) else {}
        todo += [r.node for r in map(parse_ref, wires.values()) if r is not None and r.node != "inputs"]
    return dataclasses.replace(spec, nodes={n: ns for n, ns in spec.nodes.items() if n in keep})


def plan_for(spec: Spec, registry: Registry | None = None, world: World | None = None, **kwargs) -> Plan:
    world = world or World()
    return make_plan(spec, registry or Registry.default(), world_size=world.size, **kwargs)


def open_pipeline(ref: str | Path | Spec, overrides: list[str] = (), set_files: list[str] = (), *,
                  out: str | None = None, sinks: str = SINKS_ALL, registry: Registry | None = None,
                  world: World | None = None) -> Pipeline:
    """Spec reference -> validated plan -> this rank's pipeline (nodes built, weights not yet loaded).

    ``world`` defaults to the launcher's environment (joining torch.distributed when it says so).
    """
    registry = registry or Registry.default()
    world = world or World.from_env()
    spec = read_spec(ref, overrides, set_files, out=out, registry=registry)
    if sinks == SINKS_NONE:
        spec = without_sinks(spec)
    return Pipeline(plan_for(spec, registry, world), rank=world.rank)
