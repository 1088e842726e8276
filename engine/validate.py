"""Validation: a pure function of (spec, registry, machine facts) -> list of errors.

Runs before any node is constructed or any weight is read. Reports every problem
it can find at once, each with file:line:column, node and field, and does not
report the downstream victims of one broken node twice.
"""
from __future__ import annotations

import re

import networkx as nx

from .errors import Related, SpecError, did_you_mean
from .node import BLOCK, SESSION
from .parallel.groups import STRATEGIES
from .registry import Registry
from .spec import NODE_FIELDS, TOP_LEVEL_KEYS, Spec, parse_ref
from .types import type_of_value

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


def cuda_device_count() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - torch import problems are not a spec error
        return 0


def validate(spec: Spec, registry: Registry, world_size: int = 1, cuda_devices: int | None = None,
             check_devices: bool = True) -> list[SpecError]:
    errs: list[SpecError] = []
    cuda_devices = cuda_device_count() if cuda_devices is None else cuda_devices

    def err(code, msg, where, node=None, field=None, hint=None):
        errs.append(SpecError(code, msg, where, node=node, field=field, hint=hint))

    for key in spec.raw:
        if key not in TOP_LEVEL_KEYS:
            err("unknown_section", f"unknown top-level key {key!r}", spec.where(key), field=key,
                hint=f"allowed: {', '.join(TOP_LEVEL_KEYS)}")
    if "inputs" in spec.raw and not isinstance(spec.raw["inputs"], dict):
        err("bad_inputs", "inputs: must be a mapping of name: value", spec.where("inputs"), field="inputs")
    for section in ("nodes", "sinks"):
        if spec.raw.get(section) is not None and not isinstance(spec.raw[section], dict):
            err("bad_section", f"{section}: must be a mapping of name: {{type: ..., params: ...}}, "
                f"not {type(spec.raw[section]).__name__}", spec.where(section), field=section)
    if not spec.nodes:
        err("no_nodes", "the spec has no nodes", spec.where("nodes"), field="nodes",
            hint="add a `nodes:` mapping, e.g. nodes: {enc: {type: ..., in: {...}}}")

    known_types: dict[str, type] = {}
    for name, ns in spec.nodes.items():
        where = spec.node_where(name)
        if not isinstance(ns.raw, dict) or not ns.raw:
            err("bad_node", f"{ns.section[:-1]} {name!r} must be a mapping with at least `type:`", where, node=name)
            continue
        for f in ns.raw:
            if f not in NODE_FIELDS:
                err("unknown_field", f"unknown field {f!r}", spec.node_where(name, f), node=name, field=f,
                    hint=f"fields: {', '.join(NODE_FIELDS)}")
        if "type" in ns.raw and not (isinstance(ns.type, str) and ns.type):
            err("bad_type", f"type: must be a node type name, got {ns.type!r}", spec.node_where(name, "type"),
                node=name, field="type", hint="run `fd nodes` for the list")
            continue
        if not isinstance(ns.type, str) or not ns.type:
            err("missing_type", "missing `type:`", where, node=name, field="type")
            continue
        nt = registry.get(ns.type)
        if nt is None:
            near = registry.suggest(ns.type)
            err("unknown_node_type", f"unknown node type {ns.type!r}", spec.node_where(name, "type"), node=name,
                field="type", hint=f"did you mean {', '.join(near)}?" if near else "run `fd nodes` for the list")
            continue
        if ns.is_sink != bool(nt.is_sink):
            kind = "a sink" if nt.is_sink else "not a sink"
            err("wrong_section", f"node type {ns.type!r} is {kind}; put it under "
                f"`{'sinks' if nt.is_sink else 'nodes'}:`", spec.node_where(name, "type"), node=name, field="type")
        known_types[name] = nt
        before = len(errs)
        _check_params(spec, name, ns, nt, err)
        _check_placement(spec, name, ns, nt, err, world_size, cuda_devices, check_devices)
        if len(errs) == before:
            _check_local_checkpoint(spec, name, ns, err)
        if len(errs) == before:
            _check_buildable(spec, name, ns, nt, err, errs)

    # wiring: every declared input of known-type nodes
    graph = nx.DiGraph()
    graph.add_nodes_from(spec.nodes)
    for name, nt in known_types.items():
        ns = spec.nodes[name]
        if not isinstance(ns.wires, dict):
            err("bad_wiring", "`in:` must map input ports to sources like node.port", spec.node_where(name, "in"),
                node=name, field="in")
            continue
        for port_name, src_text in ns.wires.items():
            where = spec.node_where(name, "in", port_name)
            port = nt.input_port(port_name)
            if port is None:
                names = [p.name for p in nt.inputs]
                err("unknown_input", f"node type {nt.type_name!r} has no input {port_name!r}", where, node=name,
                    field=f"in.{port_name}", hint=f"inputs: {', '.join(names) or 'none'}")
                continue
            ref = parse_ref(src_text)
            if ref is None:
                err("bad_wire", f"source {src_text!r} must look like node.port or inputs.name", where, node=name,
                    field=f"in.{port_name}")
                continue
            if ref.node == "inputs":
                if ref.port not in spec.inputs:
                    err("unknown_source", f"no run input {ref.port!r}", where, node=name, field=f"in.{port_name}",
                        hint=did_you_mean(ref.port, list(spec.inputs)))
                    continue
                src_type = type_of_value(spec.inputs[ref.port])
            else:
                if ref.node not in spec.nodes:
                    err("unknown_source", f"no node {ref.node!r}", where, node=name, field=f"in.{port_name}",
                        hint=did_you_mean(ref.node, list(spec.nodes)))
                    continue
                graph.add_edge(ref.node, name, port=port_name)
                src_nt = known_types.get(ref.node)
                if src_nt is None:
                    continue  # the source itself is broken: reported there, not again here
                out = src_nt.output_port(ref.port)
                if out is None:
                    err("unknown_source", f"node {ref.node!r} ({src_nt.type_name}) has no output {ref.port!r}",
                        where, node=name, field=f"in.{port_name}",
                        hint=f"outputs: {', '.join(p.name for p in src_nt.outputs) or 'none'}")
                    continue
                src_type = out.type
            if not src_type.is_a(port.type):
                err("type_mismatch", f"input {port_name!r} wants {port.type} but {src_text} gives {src_type}",
                    where, node=name, field=f"in.{port_name}")
        for port in nt.inputs:
            if not port.optional and port.name not in ns.wires:
                err("missing_input", f"required input {port.name!r} ({port.type}) is not connected",
                    spec.node_where(name, "in") if "in" in ns.raw else spec.node_where(name), node=name,
                    field=f"in.{port.name}")

    if not nx.is_directed_acyclic_graph(graph):
        cycle = nx.find_cycle(graph)
        names = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
        first = cycle[0][1]
        err("cycle", f"the wiring has a cycle: {names}", spec.node_where(first, "in"), node=first, field="in")
    else:
        for name, nt in known_types.items():
            if nt.phase != SESSION:
                continue
            for src in graph.predecessors(name):
                src_nt = known_types.get(src)
                if src_nt is not None and src_nt.phase == BLOCK:
                    err("phase_order", f"runs once per session but its input comes from {src!r}, which runs every "
                        "block", spec.node_where(name, "in"), node=name, field="in")

    mains = [n for n, ns in spec.nodes.items() if ns.is_sink and ns.main is True]
    if len(mains) > 1:
        err("two_main_sinks", f"only one sink may be `main: true`, found {', '.join(mains)}",
            spec.node_where(mains[1], "main"), node=mains[1], field="main")
    return spec.annotate(errs)


def device_problems(spec: Spec, cuda_devices: int | None = None) -> list[SpecError]:
    """Devices the spec pins that this machine lacks. An error for ``fd exec`` (and ``fd validate --here``),
    a warning for plain ``fd validate``: a GPU spec checked on a laptop or in CI is still a valid spec."""
    cuda_devices = cuda_device_count() if cuda_devices is None else cuda_devices
    out = []
    for name, ns in spec.nodes.items():
        dev = ns.device
        if isinstance(dev, str) and _DEVICE_RE.match(dev) and dev.startswith("cuda"):
            idx = int(dev.split(":")[1]) if ":" in dev else 0
            if idx >= cuda_devices:
                have = f"{cuda_devices} CUDA device(s)" if cuda_devices else "no CUDA device"
                out.append(SpecError("unknown_device", f"device {dev!r} is not on this machine ({have})",
                                     spec.node_where(name, "device"), node=name, field="device",
                                     hint=f"use device: auto, or override it, e.g. nodes.{name}.device=cpu"))
    return spec.annotate(out)


def unused_node_warnings(plan) -> list[SpecError]:
    """A node no sink depends on still loads its weights and runs every block/session: usually a leftover
    from an edit (a decoder swapped out, a wire moved), so ``fd validate`` points at it."""
    import networkx as nx
    sinks = [n for n in plan.order if plan.nodes[n].is_sink]
    needed = set(sinks).union(*(nx.ancestors(plan.graph, s) for s in sinks)) if sinks else set(plan.order)
    return plan.spec.annotate([
        SpecError("unused_node", "no sink uses this node's outputs, but it would still load and run",
                  plan.spec.node_where(n), node=n, hint=f"wire it to a sink, or delete nodes.{n}")
        for n in plan.order if n not in needed])


GPU_SIZED_BYTES = 2 * 2**30   # ~1B parameters in 16-bit: a model that belongs on a GPU


def cpu_fallback_warnings(plan) -> list[SpecError]:
    """Models of GPU size that ``device: auto`` put on the CPU: legal, but a 14B model on a laptop CPU is
    almost never what the user meant, so ``fd validate`` says so before any weight is fetched."""
    out = []
    for name, np_ in plan.nodes.items():
        pl = np_.placement
        if pl.device == "cpu" and pl.reason.startswith("auto") and pl.estimate_bytes >= GPU_SIZED_BYTES:
            out.append(SpecError("gpu_model_on_cpu", f"{pl.estimate_bytes / 2**30:.1f} GiB model placed on the "
                                 f"CPU ({pl.reason})", plan.spec.node_where(name, "device")
                                 if "device" in (plan.spec.nodes[name].raw or {}) else plan.spec.node_where(name),
                                 node=name, field="device", hint="run it on a machine with a GPU, or set "
                                 f"nodes.{name}.device=cpu to say you mean it"))
    return plan.spec.annotate(out)


def _check_local_checkpoint(spec, name, ns, err):
    """A local ``checkpoint:`` that is not there fails at load time, minutes later and far from the spec line;
    it costs one stat to say so now. ``random`` and ``hf://`` references are not local (the Hub is not asked)."""
    from pathlib import Path
    ref = ns.params.get("checkpoint")
    if not isinstance(ref, str) or ref == "random" or "://" in ref:
        return
    if not Path(ref).expanduser().exists():
        err("missing_checkpoint", f"checkpoint {ref!r} does not exist (relative paths are read from the "
            f"current directory)", spec.node_where(name, "params", "checkpoint"), node=name, field="params.checkpoint",
            hint="give an existing file or folder, an hf://org/repo/path reference, or random")


def _check_buildable(spec, name, ns, nt, err, errs):
    """Params each in range can still describe an impossible model (a 10^12-wide layer): build the node and ask
    its size on no device, as planning will, so that surfaces here with a line instead of as a traceback."""
    try:
        nt(name, dict(ns.params), "cpu").estimate_bytes()
    except Exception as e:  # noqa: BLE001 - any failure here is caused by the params the user wrote
        err("bad_params", f"these params do not describe a buildable {nt.type_name}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}", spec.node_where(name, "params"), node=name, field="params",
            hint=f"`fd nodes {nt.type_name}` lists each param and its range")
        prefix = (ns.section, name)
        cli = {loc for p, loc in spec.locations.items() if p[:2] == prefix and loc.file.startswith("<")}
        if cli:   # the command line changed this node's params: name those arguments too
            errs[-1] = errs[-1].with_related(*(Related(loc, "set on the command line") for loc in sorted(cli, key=str)))


def _one_node(spec: Spec, name: str) -> Spec:
    from dataclasses import replace
    return replace(spec, nodes={name: spec.nodes[name]}, via={})


def _check_params(spec, name, ns, nt, err):
    if not isinstance(ns.raw.get("params", {}) or {}, dict):
        err("bad_params", "params: must be a mapping", spec.node_where(name, "params"), node=name, field="params")
        return
    by_type = ns.raw.get("params_by_type") or {}
    if not isinstance(by_type, dict):
        err("bad_params", "params_by_type: must map node types to params", spec.node_where(name, "params_by_type"),
            node=name, field="params_by_type")
        return
    for t, ps in by_type.items():
        if ps is not None and not isinstance(ps, dict):
            err("bad_params", f"params_by_type.{t}: must be a mapping of params",
                spec.node_where(name, "params_by_type", str(t)), node=name, field=f"params_by_type.{t}")
            return
    declared = {p.name: p for p in nt.params}
    for key, value in ns.params.items():
        where = spec.node_where(name, "params", key)
        p = declared.get(key)
        if p is None:
            err("unknown_param", f"node type {nt.type_name!r} has no param {key!r}", where, node=name,
                field=f"params.{key}", hint=did_you_mean(key, list(declared)) or f"params: {', '.join(declared) or 'none'}")
            continue
        why = p.check(value)
        if why:
            err("bad_param", f"param {key!r} {why}", where, node=name, field=f"params.{key}", hint=p.doc or None)
    for p in nt.params:
        if p.required and p.name not in ns.params:
            err("missing_param", f"required param {p.name!r} ({p.type_name()}) is not set",
                spec.node_where(name, "params"), node=name, field=f"params.{p.name}", hint=p.doc or None)


def _check_placement(spec, name, ns, nt, err, world_size, cuda_devices, check_devices):
    dev = ns.device
    where = spec.node_where(name, "device")
    if not isinstance(dev, str) or not _DEVICE_RE.match(dev):
        err("bad_device", f"device {dev!r} must be cpu, cuda, cuda:N, mps or auto", where, node=name, field="device")
    elif check_devices and dev.startswith("cuda"):
        for e in device_problems(_one_node(spec, name), cuda_devices):
            err(e.code, e.message, e.location, node=e.node, field=e.field, hint=e.hint)
    if ns.capture not in ("auto", True, False):
        err("bad_capture", f"capture must be auto, true or false, got {ns.capture!r}",
            spec.node_where(name, "capture"), node=name, field="capture")
    if not isinstance(ns.offload, bool):
        err("bad_offload", f"offload must be true or false, got {ns.offload!r}", spec.node_where(name, "offload"),
            node=name, field="offload")
    par = ns.parallel
    if par is None:
        return
    pw = spec.node_where(name, "parallel")
    if not isinstance(par, dict):
        err("bad_parallel", "parallel: must be a mapping like {context: 2, strategy: ring}", pw, node=name,
            field="parallel")
        return
    for k in par:
        if k not in ("context", "strategy"):
            err("bad_parallel", f"unknown parallel setting {k!r}", spec.node_where(name, "parallel", k), node=name,
                field=f"parallel.{k}", hint="settings: context, strategy")
    n = par.get("context", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        err("bad_parallel", f"parallel.context must be a positive integer, got {n!r}",
            spec.node_where(name, "parallel", "context"), node=name, field="parallel.context")
    elif n > 1 and not nt.context_parallel:
        err("no_context_parallel", f"node type {nt.type_name!r} cannot split its sequence (parallel.context={n})",
            spec.node_where(name, "parallel", "context"), node=name, field="parallel.context")
    elif world_size % n != 0:
        err("bad_group_size", f"parallel.context={n} does not divide the world size {world_size}",
            spec.node_where(name, "parallel", "context"), node=name, field="parallel.context",
            hint=f"launch with a multiple of {n} processes (torchrun --nproc-per-node {n}) or lower it")
    strategy = par.get("strategy", "ring")
    if strategy not in STRATEGIES:
        err("bad_parallel", f"parallel.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}",
            spec.node_where(name, "parallel", "strategy"), node=name, field="parallel.strategy")
