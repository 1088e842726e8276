"""The memory plan: per node and per device, the bytes a spec will need, before any weight is read.

Why before loading: the failure this prevents is a run that validates, then grows for minutes building a
full-size model and is killed by the kernel's OOM killer without a word. Every number here comes from the
spec and the node types' own arithmetic (``Node.memory_estimate``): weights from checkpoint headers when
the file is on this machine, else from the size params (a meta-device count); session state (KV cache,
noise, decoder memory) from sink/window/batch/dtype; activations as a rough per-call estimate.

The peak of a device is the larger of two phases. Session phase: every resident weight, plus the node
running now and its activations. Block phase: resident weights (a node with ``offload: true`` has given its
weights back), every node's state, the largest activation of the block nodes, and, for nodes captured as
CUDA graphs, their graph pool (taken as one more copy of their activations).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import FdError
from .node import SESSION, NodeContext

GiB = 2 ** 30
# Memory the driver reports for common cards (GiB, approx.); fd plan --device NAME.
DEVICES: dict[str, float] = {
    "h200": 139.8, "h100": 79.6, "a100-80gb": 79.2, "a100": 39.4, "l40s": 44.4, "a6000": 47.5, "l4": 22.0,
    "a10g": 22.0, "rtx4090": 23.6, "rtx3090": 23.6, "rtx4080": 15.6, "t4": 14.6, "b200": 178.0,
}
CUDA_RESERVE = int(0.75 * GiB)   # CUDA context, allocator slack, cuBLAS workspaces


@dataclass(frozen=True)
class NodeMemory:
    node: str
    type_name: str
    device: str
    phase: str
    weights: int
    weights_source: str
    state: int = 0
    state_what: str = ""
    activations: int = 0
    graph_pool: int = 0
    offload: bool = False


@dataclass
class MemoryPlan:
    nodes: list[NodeMemory]
    peaks: dict[str, int]                    # device -> bytes
    budget: int | None = None                # bytes of the named device / --memory
    budget_name: str | None = None
    suggestions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        if self.budget is None:
            return None
        return all(p <= self.budget for p in self.peaks.values())

    def to_json(self) -> dict:
        return {"nodes": [n.__dict__ for n in self.nodes], "peaks": self.peaks, "budget": self.budget,
                "budget_name": self.budget_name, "fits": self.fits, "suggestions": self.suggestions}


def parse_bytes(text: str) -> int:
    """'24GiB', '24 GB', '80G', '512MiB', or a plain number of bytes."""
    t = str(text).strip().replace(" ", "")
    units = {"tib": 2 ** 40, "gib": GiB, "mib": 2 ** 20, "kib": 2 ** 10, "tb": 10 ** 12, "gb": 10 ** 9,
             "mb": 10 ** 6, "kb": 10 ** 3, "t": 2 ** 40, "g": GiB, "m": 2 ** 20, "k": 2 ** 10, "b": 1}
    for u in sorted(units, key=len, reverse=True):
        if t.lower().endswith(u):
            num = t[: -len(u)]
            break
    else:
        u, num = "b", t
    try:
        return int(float(num) * units[u])
    except ValueError:
        raise FdError(f"--memory {text!r}: not a size (write e.g. 24GiB, 80GB, 512MiB)") from None


def device_budget(name: str) -> int:
    key = name.lower().replace(" ", "").replace("_", "-")
    if key not in DEVICES:
        from .errors import did_you_mean
        hint = did_you_mean(key, DEVICES)
        raise FdError(f"--device {name!r}: unknown device" + (f" ({hint})" if hint else "")
                      + f" (known: {', '.join(DEVICES)}; or give --memory 24GiB)")
    return int(DEVICES[key] * GiB)


def node_memories(plan, target: str | None = None) -> list[NodeMemory]:
    """Each node's estimate; ``target="cuda"`` costs auto-placed nodes as if on a GPU (dtype auto = bf16)."""
    probes = {}
    for n in plan.order:
        np_ = plan.nodes[n]
        pinned = plan.spec.nodes[n].device
        dev = np_.placement.device
        if target == "cuda" and not np_.is_sink and not (isinstance(pinned, str) and pinned == "cpu"):
            dev = dev if dev.startswith("cuda") else "cuda:0"
        probes[n] = np_.node_type(n, dict(np_.params), NodeContext(device=dev, capture=np_.capture.captured))
    out = []
    for n in plan.order:
        np_, node = plan.nodes[n], probes[n]
        upstream = {port: probes[ref.node] for port, ref in np_.wires.items() if ref.node != "inputs"}
        est = node.memory_estimate(upstream)
        captured = np_.capture.captured or (target == "cuda" and node.capturable and np_.phase != SESSION
                                            and not node.is_sink and plan.spec.nodes[n].capture is not False)
        act = int(est.get("activations", 0))
        out.append(NodeMemory(n, np_.type_name, node.device, np_.phase, int(est.get("weights", 0)),
                              est.get("weights_source", ""), int(est.get("state", 0)), est.get("state_what", ""),
                              act, act if captured else 0,
                              bool(np_.offload) and node.device.startswith("cuda")))   # offload: to host memory
    return out


def peaks(nodes: list[NodeMemory]) -> dict[str, int]:
    out = {}
    for dev in dict.fromkeys(n.device for n in nodes if not n.type_name.startswith("sink.")):
        on = [n for n in nodes if n.device == dev]
        resident = sum(n.weights for n in on if not n.offload)
        session = max([resident + (n.weights if n.offload else 0) + n.activations
                       for n in on if n.phase == SESSION] or [resident])
        block = (resident + sum(n.state for n in on) + sum(n.graph_pool for n in on)
                 + max([n.activations for n in on if n.phase != SESSION] or [0]))
        reserve = CUDA_RESERVE if dev.startswith("cuda") else 0
        out[dev] = max(session, block) + reserve
    return out


def suggest(nodes: list[NodeMemory], peak: dict[str, int], budget: int) -> list[str]:
    """Spec changes that lower the peak, each with the bytes it saves on the worst device."""
    dev = max(peak, key=peak.get)
    over = peak[dev] - budget
    if over <= 0:
        return []
    on = [n for n in nodes if n.device == dev]
    out = []
    for n in on:
        if n.phase == SESSION and not n.offload and n.weights and not n.type_name.startswith("wan.dit"):
            out.append(f"offload the run-once node {n.node!r}: nodes.{n.node}.offload=true "
                       f"(-{n.weights / GiB:.1f} GiB while blocks run)")
    for n in on:
        if n.state and "KV" in n.state_what:
            need = n.state - over
            frac = max(0.0, need / n.state)
            out.append(f"a smaller KV window for {n.node!r}: nodes.{n.node}.params.window_frames set to about "
                       f"{frac:.0%} of today's frames (the KV cache is {n.state / GiB:.1f} GiB)")
            out.append(f"context parallelism for the DiT feeding {n.node!r}: `parallel: {{context: N}}` splits the "
                       f"KV cache ({n.state / GiB:.1f} GiB) and activations over N GPUs")
    big = [n for n in on if n.weights and "fp32" in n.weights_source]
    for n in big:
        out.append(f"bf16 weights for {n.node!r}: nodes.{n.node}.params.dtype=bf16 (-{n.weights / 2 / GiB:.1f} GiB)")
    weights = sum(n.weights for n in on if not n.offload)
    if weights > budget:
        out.append(f"the resident weights alone ({weights / GiB:.1f} GiB) exceed the budget; context parallelism "
                   "splits activations and the KV cache, not weights")
    larger = [d for d, gib in sorted(DEVICES.items(), key=lambda kv: kv[1]) if gib * GiB >= peak[dev]]
    if larger:
        out.append(f"a card with more memory: {', '.join(larger[:4])}")
    return out


def memory_plan(plan, device: str | None = None, memory: str | int | None = None) -> MemoryPlan:
    """The plan's memory: ``device`` a name from DEVICES (costs the nodes on CUDA), ``memory`` a budget."""
    budget = name = None
    if device:
        budget, name = device_budget(device), device
    if memory is not None:
        budget = parse_bytes(memory) if isinstance(memory, str) else int(memory)
        name = f"{memory}" if not device else f"{device} ({memory})"
    nodes = node_memories(plan, target="cuda" if device else None)
    pk = peaks(nodes)
    mp = MemoryPlan(nodes, pk, budget, name)
    if budget is not None:
        mp.suggestions = suggest(nodes, pk, budget)
    return mp


def host_available_bytes() -> int | None:
    """MemAvailable of this machine (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def fit_warnings(plan) -> list[str]:
    """What ``fd exec`` says before loading when the plan's peak exceeds what this machine has free."""
    mp = memory_plan(plan)
    out = []
    for dev, need in mp.peaks.items():
        have = None
        if dev == "cpu":
            have = host_available_bytes()
        elif dev.startswith("cuda"):
            import torch
            if torch.cuda.is_available():
                idx = int(dev.split(":")[1]) if ":" in dev else 0
                have = torch.cuda.mem_get_info(idx)[0] if idx < torch.cuda.device_count() else None
        if have is not None and need > have:
            out.append(f"{plan.spec.file}: the memory plan needs about {need / GiB:.1f} GiB on {dev}, which has "
                       f"{have / GiB:.1f} GiB free; this run may be killed for lack of memory "
                       f"(`fd plan {plan.spec.name}` shows where it goes and what would help)")
    return out
