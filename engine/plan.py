"""The plan: a validated spec turned into a networkx graph with phases, order, placement and capture decisions.

Everything a person might want to see about how a spec will run — which node runs
where, once or every block, captured as a CUDA graph or not and why, in which
context-parallel group — is recorded here and drawn by ``fd viz``. A plan is a value:
frozen once built, holding node *types* and params, not live nodes. The pipeline
constructs each node from it with a ``NodeContext`` (engine/node.py). Planning only
builds throw-away instances so that ``device: auto`` can ask for memory estimates.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import networkx as nx

from .errors import SpecError, SpecErrors
from .node import BLOCK, SESSION, Node, NodeContext
from .placement import Placement, place
from .registry import Registry
from .spec import Spec, parse_ref
from .validate import validate


@dataclass(frozen=True)
class CaptureDecision:
    captured: bool
    reason: str


@dataclass(frozen=True)
class NodePlan:
    name: str
    node_type: type[Node]
    params: Mapping[str, Any]       # the spec's params (defaults are filled in by the node)
    phase: str
    placement: Placement
    capture: CaptureDecision
    parallel: Mapping | None        # {"context": N, "strategy": ...} or None
    wires: Mapping[str, Any]        # port -> Ref
    offload: bool = False

    @property
    def type_name(self) -> str:
        return self.node_type.type_name

    @property
    def is_sink(self) -> bool:
        return self.node_type.is_sink

    def context(self, parallel: Any = None, rank: int = 0, world_size: int = 1) -> NodeContext:
        """The NodeContext a pipeline constructs this node with (``parallel``: its created group)."""
        return NodeContext(device=self.placement.device, capture=self.capture.captured,
                           capture_reason=self.capture.reason, parallel=parallel, rank=rank, world_size=world_size)

    def build(self, parallel: Any = None, rank: int = 0, world_size: int = 1) -> Node:
        return self.node_type(self.name, dict(self.params), self.context(parallel, rank, world_size))


@dataclass(frozen=True)
class Plan:
    spec: Spec
    graph: nx.DiGraph
    order: tuple[str, ...]           # topological, session nodes first
    nodes: Mapping[str, NodePlan]
    world_size: int = 1

    @property
    def session_nodes(self) -> list[str]:
        return [n for n in self.order if self.nodes[n].phase == SESSION]

    @property
    def block_nodes(self) -> list[str]:
        return [n for n in self.order if self.nodes[n].phase == BLOCK]

    @property
    def sinks(self) -> list[str]:
        return [n for n in self.order if self.nodes[n].is_sink]

    def main_sink(self) -> str | None:
        return main_sink(self.spec, lambda n: self.nodes[n].node_type if n in self.nodes else None)


def main_sink(spec: Spec, type_of) -> str | None:
    """The sink that ``--out`` redirects and ``fd serve`` streams: the one marked ``main: true``, else the
    first video sink (its node type sets ``is_video``), else the first sink. ``type_of(name)`` gives a
    node's type (or None)."""
    sinks = [n for n, ns in spec.nodes.items() if ns.is_sink]
    for n in sinks:
        if spec.nodes[n].main is True:
            return n
    for n in sinks:
        if getattr(type_of(n), "is_video", False):
            return n
    return sinks[0] if sinks else None


def decide_capture(node: type[Node], requested: Any, device: str) -> CaptureDecision:
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
    types: dict[str, type[Node]] = {}
    for name, ns in spec.nodes.items():
        types[name] = registry.get(ns.type)
        graph.add_node(name, type=ns.type, phase=types[name].phase)
    wires: dict[str, dict] = {}
    for name, ns in spec.nodes.items():
        wires[name] = {}
        for port, text in ns.wires.items():
            ref = parse_ref(text)
            wires[name][port] = ref
            if ref.node != "inputs":
                graph.add_edge(ref.node, name, port=port, src_port=ref.port,
                               type=str(types[ref.node].output_port(ref.port).type))
    # session phase first, then block phase; each topologically ordered, file order breaking ties
    file_order = {n: i for i, n in enumerate(spec.nodes)}
    topo = list(nx.lexicographical_topological_sort(graph, key=lambda n: file_order[n]))
    order = [n for n in topo if types[n].phase == SESSION] + [n for n in topo if types[n].phase == BLOCK]
    # throw-away instances: only asked for their parameter-memory estimate
    probes = {n: (spec.nodes[n].device, types[n](n, dict(spec.nodes[n].params))) for n in order}
    placements = place(probes, cuda_devices=cuda_devices)
    refused = [SpecError("unsupported_on_device", msg, spec.node_where(n, "params", field), node=n,
                         field=f"params.{field}", hint=hint)
               for n in order for field, msg, hint in probes[n][1].device_problems(placements[n].device)
               if check_devices]         # without devices to check (a spec read on another machine) there is no refusal
    if refused:
        raise SpecErrors(spec.annotate(refused))
    nodes: dict[str, NodePlan] = {}
    for name in order:
        nt, ns = types[name], spec.nodes[name]
        par = dict(ns.parallel) if isinstance(ns.parallel, dict) else None
        if par is not None:
            par.setdefault("context", 1)
            par.setdefault("strategy", "ring")
        nodes[name] = NodePlan(name=name, node_type=nt, params=MappingProxyType(dict(ns.params)), phase=nt.phase,
                               placement=placements[name],
                               capture=decide_capture(nt, ns.capture, placements[name].device),
                               parallel=None if par is None else MappingProxyType(par),
                               wires=MappingProxyType(wires[name]), offload=bool(ns.offload))
    return Plan(spec=spec, graph=graph, order=tuple(order), nodes=MappingProxyType(nodes), world_size=world_size)
