"""The plan: a validated spec turned into a networkx graph with phases, order, placement and capture decisions.

Building a plan constructs node objects (cheap: no weights) so that ``device: auto``
can ask them for parameter-memory estimates. Everything a person might want to see
about how a spec will run — which node runs where, once or every block, captured
as a CUDA graph or not and why, in which context-parallel group — is recorded here
and drawn by ``fd viz``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from .errors import SpecErrors
from .node import BLOCK, SESSION, Node
from .placement import Placement, place
from .registry import Registry
from .spec import Spec, parse_ref
from .validate import validate


@dataclass
class CaptureDecision:
    captured: bool
    reason: str


@dataclass
class NodePlan:
    name: str
    node: Node
    phase: str
    placement: Placement
    capture: CaptureDecision
    parallel: dict | None           # {"context": N, "strategy": ...} or None
    wires: dict[str, Any]           # port -> Ref
    offload: bool = False
    timings_ms: list[float] = field(default_factory=list)  # filled by sessions, read by viz/bench

    @property
    def type_name(self) -> str:
        return self.node.type_name


@dataclass
class Plan:
    spec: Spec
    graph: nx.DiGraph
    order: list[str]                 # topological, session nodes first
    nodes: dict[str, NodePlan]
    world_size: int = 1

    @property
    def session_nodes(self) -> list[str]:
        return [n for n in self.order if self.nodes[n].phase == SESSION]

    @property
    def block_nodes(self) -> list[str]:
        return [n for n in self.order if self.nodes[n].phase == BLOCK]

    @property
    def sinks(self) -> list[str]:
        return [n for n in self.order if self.nodes[n].node.is_sink]

    def main_sink(self) -> str | None:
        """The sink ``--out`` redirects: the one marked ``main: true``, else the first video sink."""
        for n in self.sinks:
            if self.spec.nodes[n].main is True:
                return n
        for n in self.sinks:
            if self.nodes[n].node.param("path") is not None and getattr(self.nodes[n].node, "is_video", False):
                return n
        return self.sinks[0] if self.sinks else None


def decide_capture(node: Node, requested: Any, device: str) -> CaptureDecision:
    if requested is False:
        return CaptureDecision(False, "capture: false in the spec")
    if node.phase == SESSION:
        return CaptureDecision(False, "runs once per session: nothing to replay")
    if node.is_sink:
        return CaptureDecision(False, "a sink: writes on the host")
    if not node.capturable:
        return CaptureDecision(False, f"{node.type_name} is not marked capturable (dynamic shapes, host syncs, "
                               "or no graph path yet)")
    if not str(device).startswith("cuda"):
        return CaptureDecision(False, f"runs on {device}: CUDA graphs need a CUDA device")
    return CaptureDecision(True, "static shapes, no host sync: captured after warmup, replayed per block")


def make_plan(spec: Spec, registry: Registry, world_size: int = 1, cuda_devices: int | None = None,
              check_devices: bool = True) -> Plan:
    errors = validate(spec, registry, world_size=world_size, cuda_devices=cuda_devices, check_devices=check_devices)
    if errors:
        raise SpecErrors(errors)
    graph = nx.DiGraph()
    instances: dict[str, Node] = {}
    for name, ns in spec.nodes.items():
        nt = registry.get(ns.type)
        instances[name] = nt(name, dict(ns.params), device="cpu")
        graph.add_node(name, type=ns.type, phase=nt.phase)
    wires: dict[str, dict] = {}
    for name, ns in spec.nodes.items():
        wires[name] = {}
        for port, text in ns.wires.items():
            ref = parse_ref(text)
            wires[name][port] = ref
            if ref.node != "inputs":
                graph.add_edge(ref.node, name, port=port, src_port=ref.port,
                               type=str(instances[ref.node].output_port(ref.port).type))
    # session phase first, then block phase; each topologically ordered, file order breaking ties
    file_order = {n: i for i, n in enumerate(spec.nodes)}
    topo = list(nx.lexicographical_topological_sort(graph, key=lambda n: file_order[n]))
    order = [n for n in topo if instances[n].phase == SESSION] + [n for n in topo if instances[n].phase == BLOCK]
    placements = place({n: (spec.nodes[n].device, instances[n]) for n in order}, cuda_devices=cuda_devices)
    nodes: dict[str, NodePlan] = {}
    for name in order:
        inst, ns = instances[name], spec.nodes[name]
        inst.device = placements[name].device
        par = dict(ns.parallel) if isinstance(ns.parallel, dict) else None
        if par is not None:
            par.setdefault("context", 1)
            par.setdefault("strategy", "ring")
        nodes[name] = NodePlan(name=name, node=inst, phase=inst.phase, placement=placements[name],
                               capture=decide_capture(inst, ns.capture, placements[name].device),
                               parallel=par, wires=wires[name], offload=bool(ns.offload))
    return Plan(spec=spec, graph=graph, order=order, nodes=nodes, world_size=world_size)
