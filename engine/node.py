"""The node contract: what a node type declares, and the calls the engine makes on it.

Like a MediaPipe calculator, a node type states its typed inputs, outputs and
params as class attributes, so a spec can be checked against every contract
before any node is constructed or any weight is read. The engine then calls:

    node = NodeType(name, params, context)     # cheap: no weights
    node.estimate_bytes()                      # for `device: auto`
    node.load()                                # heavy: weights onto node.device
    node.blocks_available()                    # a finite source (a video file): the blocks it can feed
    state = node.new_state()                   # per-session (KV cache, decoder memory)
    outputs = node.run(inputs, state, step)    # once per session or once per block
    values = node.state_tensors(state)         # snapshot: tensors and JSON scalars (docs/sessions.md)
    state = node.load_state(node.new_state(), values)   # restore or fork

The plan is a value: everything the planner decided about a node (device, context-parallel
group, CUDA-graph capture) reaches it once, as the ``NodeContext`` it is constructed with,
and what changed since its last call reaches it as ``Step.changed``. The engine never sets
attributes on a node.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar

from .types import PortType


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

SESSION = "session"  # runs once per session (and again when one of its inputs changes)
BLOCK = "block"      # runs once per autoregressive block


@dataclass(frozen=True)
class Port:
    name: str
    type: PortType
    doc: str = ""
    optional: bool = False


@dataclass(frozen=True)
class Param:
    name: str
    type: type | tuple[type, ...]
    default: Any = REQUIRED
    doc: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    nullable: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def type_name(self) -> str:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        return " | ".join(t.__name__ for t in types) + (" | null" if self.nullable else "")

    def check(self, value: Any) -> str | None:
        """Return why ``value`` is not acceptable, or None when it is."""
        if value is None:
            return None if (self.nullable or self.default is None) else f"must be {self.type_name()}, got null"
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok and float in types and isinstance(value, int) and not isinstance(value, bool):
            ok = True  # an int literal is a fine float
        if not ok:
            return f"must be {self.type_name()}, got {type(value).__name__} {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {list(self.choices)}, got {value!r}"
        if self.min is not None and isinstance(value, (int, float)) and value < self.min:
            return f"must be >= {self.min}, got {value!r}"
        if self.max is not None and isinstance(value, (int, float)) and value > self.max:
            return f"must be <= {self.max}, got {value!r}"
        return None


@dataclass(frozen=True)
class NodeContext:
    """What the plan decided for one node, handed to it at construction.

    ``parallel`` is the node's context-parallel group (an ``engine.parallel.ParallelGroup``)
    when the spec gives it one and the pipeline has created it, else None. ``capture`` is the
    planner's CUDA-graph decision: a capturable node may replay graphs only when it is True.
    """
    device: str = "cpu"
    capture: bool = False
    capture_reason: str = ""
    parallel: Any = None
    rank: int = 0
    world_size: int = 1

    @classmethod
    def of(cls, value: "NodeContext | str | None") -> "NodeContext":
        """A context from a context, a bare device string (tests, scripts) or None (cpu)."""
        if isinstance(value, NodeContext):
            return value
        return cls(device=str(value) if value is not None else "cpu")


@dataclass(frozen=True)
class Step:
    """What a node is told about the call it is in."""
    block: int | None          # None in the session phase
    inputs: dict[str, Any]     # the run inputs (prompt, seed, ...) as they are now
    first_in_session: bool = True
    changed: frozenset[str] = frozenset()   # input ports whose value differs from this node's last call


class Node:
    """Base class of every node type. Subclasses set the ClassVars and override what they need."""

    type_name: ClassVar[str] = ""
    doc: ClassVar[str] = ""
    inputs: ClassVar[tuple[Port, ...]] = ()
    outputs: ClassVar[tuple[Port, ...]] = ()
    params: ClassVar[tuple[Param, ...]] = ()
    phase: ClassVar[str] = BLOCK
    # run() has static shapes and no host sync once warm: the planner may capture it as a CUDA graph.
    capturable: ClassVar[bool] = False
    # The node can split its sequence across a context-parallel group (``parallel: {context: N}``).
    context_parallel: ClassVar[bool] = False
    # A sink writes outputs; only rank 0 runs sinks under torch.distributed.
    is_sink: ClassVar[bool] = False

    def __init__(self, name: str, params: dict[str, Any], context: NodeContext | str | None = None):
        self.name = name
        values = {p.name: p.default for p in self.params if not p.required}
        values.update(params)
        self.p = SimpleNamespace(**values)
        self.ctx = NodeContext.of(context)

    @property
    def device(self) -> str:
        return self.ctx.device

    @property
    def parallel(self) -> Any:
        """The node's context-parallel group, or None."""
        return self.ctx.parallel

    # --- contract lookups -------------------------------------------------
    @classmethod
    def input_port(cls, name: str) -> Port | None:
        return next((p for p in cls.inputs if p.name == name), None)

    @classmethod
    def output_port(cls, name: str) -> Port | None:
        return next((p for p in cls.outputs if p.name == name), None)

    @classmethod
    def param(cls, name: str) -> Param | None:
        return next((p for p in cls.params if p.name == name), None)

    # --- plan facts -------------------------------------------------------
    def facts(self, sources: dict[str, "Node"]) -> dict[str, Any]:
        """Facts a drawing or a memory plan shows about this node before any weight is read (e.g. the KV
        cache a sampler will allocate), from params alone; ``sources`` are the (unloaded) nodes wired into
        its input ports. ``notes`` (a list of short lines) are shown as they are; the engine reads the rest
        without knowing what it means."""
        return {}

    # --- lifecycle ----------------------------------------------------------
    def estimate_bytes(self) -> int:
        """Parameter memory this node will hold once loaded; read by ``device: auto``. No loading."""
        return 0

    def device_problems(self, device: str) -> list[tuple[str, str, str]]:
        """Params this node cannot honour on ``device`` (where planning placed it: 'cpu', 'cuda:0', ...), as
        (param name, message, hint) each; planning turns them into spec errors at that param's line, so
        ``fd validate`` reports them before anything loads. Params alone: no weights, no allocation."""
        return []

    def preflight(self, upstream: dict[str, "Node"]) -> None:
        """Cheap checks before any node of the pipeline loads weights (files present, configs that must agree).
        ``upstream``: each wired input port -> the node that produces it. Raise an FdError to refuse."""

    def memory_estimate(self, upstream: dict[str, "Node"]) -> dict[str, Any]:
        """Bytes this node will hold, for the memory plan (engine/memory.py), without loading anything:
        ``weights`` (and ``weights_source``: how they were counted), ``state`` per session (and ``state_what``),
        ``activations`` of one call. ``upstream`` maps each wired input port to the (unloaded) node feeding it,
        so a sampler can size the KV cache of the model it drives."""
        return {"weights": self.estimate_bytes(), "weights_source": "estimate_bytes"}

    def load(self) -> None:
        """Read weights onto ``self.device``. Called once, after validation and placement."""

    def offload(self) -> None:
        """Give device memory back after a once-per-session node has run (``offload: true``)."""

    def blocks_available(self) -> int | None:
        """How many blocks a node that reads a finite source (a video file) can feed, known once ``preflight``
        has run; runners stop there (``Pipeline.blocks_available``). None, the default: no limit."""
        return None

    def new_state(self) -> Any:
        """Fresh per-session state; ``Session.reset()`` calls it again."""
        return None

    def run(self, inputs: dict[str, Any], state: Any, step: Step) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__}.run")

    def run_batch(self, inputs: list[dict[str, Any]], states: list[Any], steps: list[Step]) -> list[dict[str, Any]]:
        """The same block of several sessions (``engine.session.step_together``): one output dict per session.
        Default: one ``run`` after the other. A node that batches them (one forward for all) must return what
        the lone runs return, bit for bit: a session's output may not depend on its batch."""
        return [self.run(i, s, st) for i, s, st in zip(inputs, states, steps)]

    def close(self, state: Any) -> None:
        """End of session: flush and finalise (sinks commit their files here)."""

    def abort(self, state: Any) -> None:
        """The session failed: drop partial work (sinks delete their temporary files)."""

    # --- snapshots (engine/snapshot.py) -------------------------------------
    def state_tensors(self, state: Any) -> dict[str, Any]:
        """Everything ``state`` holds that the next block depends on, for ``session.snapshot()``: a flat dict of
        tensors (saved with safetensors) and JSON values (ints, floats, strings, bools, None, lists of them).

        The default covers stateless nodes (state None); a node that keeps state must say what it is, else
        snapshots would silently lose it. Sinks are never asked: a restored session writes new outputs."""
        if state is None:
            return {}
        raise NotImplementedError(f"{type(self).__name__} keeps per-session state but does not declare it "
                                  "(state_tensors / load_state)")

    def load_state(self, state: Any, values: dict[str, Any]) -> Any:
        """Put ``values`` (what ``state_tensors`` returned, tensors on the CPU) into ``state``, a fresh
        ``new_state()``, and return the state to use. Raise ValueError naming the field on a mismatch."""
        if not values:
            return state
        raise NotImplementedError(f"{type(self).__name__} does not load snapshot state")

    def release(self, state: Any) -> None:
        """The session dropped this state (closed, aborted or reset): free or recycle what it holds, e.g. a
        KV cache and the CUDA graphs captured over it, for the next session of this node."""
