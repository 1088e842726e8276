"""What a drawing shows, read out of a Plan in one place.

Every renderer (terminal tree, SVG, DOT, HTML) draws a ``VizGraph`` and never touches the
Plan itself. The plan's per-node objects are being reshaped (timings are moving off the
Plan), so all knowledge of where a fact lives is in the small ``_``-prefixed accessors at
the top of this file: adapting viz to a new Plan shape means editing those, nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------- plan accessors
# The only functions that know the Plan's shape.


def _node_names(plan) -> list[str]:
    return list(plan.order)


def _spec(plan):
    return plan.spec


def _decisions(plan, name: str) -> dict:
    """What the planner decided for one node, as plain values."""
    np_ = plan.nodes[name]
    return {"phase": np_.phase, "device": str(np_.placement.device), "device_reason": np_.placement.reason,
            "est_bytes": int(getattr(np_.placement, "estimate_bytes", 0) or 0), "offload": bool(np_.offload),
            "captured": bool(np_.capture.captured), "capture_reason": np_.capture.reason,
            "parallel": dict(np_.parallel) if np_.parallel else None}


def _instance(plan, name: str):
    """A node built from the plan (no weights): what it declares, its params and facts."""
    return plan.nodes[name].build()


def _wires(plan, name: str) -> dict:
    return plan.nodes[name].wires


def _timings_ms(plan, name: str, timings: dict | None) -> list[float]:
    if timings is not None:               # explicit per-node timings (e.g. from a session or a bench run)
        return [float(x) for x in timings.get(name, ())]
    return []


def _where(plan, *path) -> str:
    """file:line of a spec entry, e.g. ("nodes", "dit") or ("inputs", "seed")."""
    loc = plan.spec.where(*path)
    return f"{loc.file}:{loc.line}" if getattr(loc, "line", None) else str(loc.file)


# --------------------------------------------------------------------------- the model


@dataclass
class VEdge:
    src: str
    src_port: str
    dst: str
    dst_port: str
    type: str
    doc: str = ""            # the consuming port's doc (it carries the shape, e.g. "[B, L, dim]")


@dataclass
class VNode:
    name: str
    kind: str                # "node" or "input"
    type_name: str = ""
    doc: str = ""
    phase: str = "block"     # "session" | "block" | "input"
    device: str = ""
    device_reason: str = ""
    offload: bool = False
    captured: bool = False
    capture_reason: str = ""
    parallel: dict | None = None
    is_sink: bool = False
    in_ports: list[str] = field(default_factory=list)
    out_ports: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    where: str = ""
    kv: dict | None = None
    notes: list[str] = field(default_factory=list)   # the node's own plan facts (Node.facts()["notes"])
    est_bytes: int = 0
    timings_ms: list[float] = field(default_factory=list)

    def p50(self) -> float | None:
        return _quantile(self.timings_ms, 0.5)

    def p99(self) -> float | None:
        return _quantile(self.timings_ms, 0.99)


@dataclass
class VizGraph:
    name: str
    description: str
    file: str
    nodes: dict[str, VNode]            # graph inputs first, then the plan's order
    edges: list[VEdge]

    def groups(self) -> dict[str, list[str]]:
        """Frames to draw: context-parallel groups (by strategy and size) and captured segments."""
        out: dict[str, list[str]] = {}
        for n in self.nodes.values():
            par = n.parallel or {}
            if int(par.get("context", 1)) > 1:
                out.setdefault(f"context parallel: {par.get('strategy', 'ring')} × {par['context']}", []).append(n.name)
        seg, k = [], 0
        for n in [*self.nodes.values(), None]:
            if n is not None and n.captured:
                seg.append(n.name)
                continue
            if seg:
                k += 1
                out[f"CUDA graph segment {k}"] = seg
                seg = []
        return out


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    i = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[i]


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def node_facts(plan, name: str) -> dict:
    """What a node says about itself before any weight is read (Node.facts): e.g. an AR sampler's KV cache
    (sink, window, dtype, bytes, with SelfKVCache's formula) and notes such as which steps go to which expert."""
    inst = _instance(plan, name)
    sources = {port: _instance(plan, ref.node) for port, ref in _wires(plan, name).items() if ref.node != "inputs"}
    try:
        return dict(inst.facts(sources) or {})
    except Exception:   # a third-party node whose facts fail: draw none rather than fail the drawing
        return {}


def kv_cache_facts(plan, name: str) -> dict | None:
    return node_facts(plan, name).get("kv_cache")


def build(plan, timings: dict[str, list[float]] | None = None) -> VizGraph:
    """The drawing model of ``plan``; ``timings`` ({node: [ms, ...]}) overrides what the plan recorded."""
    nodes: dict[str, VNode] = {}
    edges: list[VEdge] = []
    names = _node_names(plan)
    for name in names:
        for port, ref in _wires(plan, name).items():
            if ref.node == "inputs" and f"inputs.{ref.port}" not in nodes:
                value = _spec(plan).inputs.get(ref.port)
                nodes[f"inputs.{ref.port}"] = VNode(
                    name=f"inputs.{ref.port}", kind="input", type_name=type(value).__name__, phase="input",
                    out_ports=[ref.port], params={"value": _jsonable(value)},
                    where=_where(plan, "inputs", ref.port))
    for name in names:
        inst = _instance(plan, name)
        facts = node_facts(plan, name)
        wires = _wires(plan, name)
        declared_in = [p.name for p in inst.inputs if p.name in wires]
        nodes[name] = VNode(
            name=name, kind="node", type_name=inst.type_name, doc=inst.doc, is_sink=bool(inst.is_sink),
            in_ports=declared_in + [p for p in wires if p not in declared_in],
            out_ports=[p.name for p in inst.outputs], params=_jsonable(vars(inst.p)),
            where=_where(plan, "sinks" if inst.is_sink else "nodes", name), kv=facts.get("kv_cache"),
            notes=[str(x) for x in facts.get("notes", ())],
            timings_ms=_timings_ms(plan, name, timings), **_decisions(plan, name))
        for port, ref in wires.items():
            if ref.node == "inputs":
                src, sport, etype = f"inputs.{ref.port}", ref.port, nodes[f"inputs.{ref.port}"].type_name
            else:
                src, sport = ref.node, ref.port
                op = _instance(plan, ref.node).output_port(ref.port)
                etype = str(op.type) if op is not None else "?"
            ip = inst.input_port(port)
            edges.append(VEdge(src, sport, name, port, etype, ip.doc if ip is not None else ""))
    spec = _spec(plan)
    return VizGraph(spec.name, spec.description, spec.file, nodes, edges)
