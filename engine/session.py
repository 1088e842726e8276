"""Running a plan: a Pipeline holds loaded nodes; a Session holds one rollout's state.

The session phase (text/image encoding, cache setup) runs before the first block
and again only for nodes whose inputs changed (a prompt switch re-encodes the
prompt; nothing else). The block phase runs once per ``step()``, node by node in
topological order, and its outputs reach the sinks block by block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .errors import FdError, NodeRuntimeError
from .node import SESSION, Node, Step
from .plan import Plan
from .timing import NodeTimer


@dataclass
class BlockResult:
    block: int
    outputs: dict[str, dict[str, Any]]           # node -> port -> value (block-phase nodes)
    timings_ms: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """The nodes of a plan, constructed with their contexts. ``load()`` reads weights; sessions share
    the loaded nodes. Per-node block timings of every session are kept in ``timings_ms``."""

    def __init__(self, plan: Plan, rank: int = 0):
        self.plan = plan
        self.rank = rank
        self.loaded = False
        self.load_ms: dict[str, float] = {}
        self.timings_ms: dict[str, list[float]] = {n: [] for n in plan.order}
        self.nodes: dict[str, Node] = {}

    def _parallel_groups(self) -> dict:
        """Create the context-parallel process groups the plan asks for.

        Every rank calls this in the same order (``new_group`` is collective). Nodes without a
        ``parallel:`` setting run replicated on every rank (deterministic, so their results agree
        without a broadcast); only rank 0 runs sinks.
        """
        sizes = {n: np_.parallel["context"] for n, np_ in self.plan.nodes.items() if np_.parallel}
        if not sizes:
            return {}
        from .parallel.groups import make_context_groups
        strategies = {n: self.plan.nodes[n].parallel["strategy"] for n in sizes}
        return make_context_groups(self.plan.world_size, sizes, strategies, rank=self.rank)

    def build(self) -> "Pipeline":
        """Construct every node with its NodeContext (no weights yet). ``load()`` calls it first."""
        if not self.nodes:
            groups = self._parallel_groups()
            self.nodes = {n: self.plan.nodes[n].build(groups.get(n), self.rank, self.plan.world_size)
                          for n in self.plan.order}
        return self

    def load(self, progress: Callable[[str, int, int], None] | None = None) -> "Pipeline":
        self.build()
        total = len(self.plan.order)
        for name in self.plan.order:   # every node's cheap checks before the first weight is read
            wires = self.plan.nodes[name].wires
            upstream = {port: self.nodes[ref.node] for port, ref in wires.items() if ref.node in self.nodes}
            try:
                self.nodes[name].preflight(upstream)
            except FdError:
                raise
            except Exception as e:
                raise NodeRuntimeError(name, self.plan.spec.node_where(name), "checking its inputs", e) from e
        for i, name in enumerate(self.plan.order):
            if progress:
                progress(name, i, total)
            timer = NodeTimer("cpu")
            timer.start()
            try:
                self.nodes[name].load()
            except FdError:
                raise
            except Exception as e:
                raise NodeRuntimeError(name, self.plan.spec.node_where(name), "loading", e) from e
            timer.stop()
            self.load_ms[name] = timer.ms()
        if progress:
            progress("", total, total)
        self.loaded = True
        return self

    def blocks_available(self) -> int | None:
        """The fewest blocks any finite source node (a video file) can feed, or None when none limits the run."""
        counts = [c for c in (node.blocks_available() for node in self.nodes.values()) if c is not None]
        return min(counts) if counts else None

    def blocks_to_run(self, requested: int | None = None) -> int:
        """``requested`` (else the spec's ``inputs.num_blocks``), capped by what the sources hold; with
        neither, the sources' count (a video spec needs no num_blocks), else 1."""
        if requested is None and "num_blocks" in self.plan.spec.inputs:
            requested = int(self.plan.spec.inputs["num_blocks"])
        available = self.blocks_available()
        if available is None:
            return 1 if requested is None else requested
        return available if requested is None else min(requested, available)

    def open_session(self, **inputs) -> "Session":
        if not self.loaded:
            self.load()
        return Session(self, inputs)


class Session:
    """One rollout: run inputs, per-node state, the values on every edge, and the block counter."""

    def __init__(self, pipeline: Pipeline, inputs: dict[str, Any] | None = None):
        self.pipeline = pipeline
        self.plan = pipeline.plan
        self.nodes = pipeline.nodes
        self.inputs = dict(self.plan.spec.inputs)
        for k, v in (inputs or {}).items():
            self._check_input(k)
            self.inputs[k] = v
        self.closed = False
        self._init_state()

    # ------------------------------------------------------------------ state
    def _init_state(self, keep_sinks: bool = False) -> None:
        self.block = 0
        old = getattr(self, "states", {})
        self.states = {}
        for n in self.plan.order:
            node = self.nodes[n]
            if keep_sinks and node.is_sink:
                self.states[n] = old[n]       # the output file goes on across a reset
                continue
            if n in old:
                node.release(old[n])
            self.states[n] = node.new_state()
        self.values: dict[str, dict[str, Any]] = {}
        self._last_inputs: dict[str, dict[str, int]] = {}
        self._dirty = set(self.plan.session_nodes)

    def reset(self) -> None:
        """Start the rollout again from block 0 with fresh node state (KV caches, decoder memory); sinks keep
        writing to the same outputs."""
        self._init_state(keep_sinks=True)

    def _check_input(self, name: str) -> None:
        if name not in self.plan.spec.inputs:
            raise FdError(f"{self.plan.spec.file}: the spec has no input {name!r} "
                          f"(inputs: {', '.join(self.plan.spec.inputs)})")

    def set_input(self, name: str, value: Any) -> None:
        """Change a run input between blocks (e.g. the prompt); dependent session nodes re-run before the next
        block, block nodes see it at once. Node state such as the self-attention KV cache is kept."""
        self._check_input(name)
        self.inputs[name] = value
        for n in self.plan.session_nodes:
            if any(r.node == "inputs" and r.port == name for r in self.plan.nodes[n].wires.values()):
                self._dirty.add(n)

    # ------------------------------------------------------------------ snapshots (engine/snapshot.py)
    def snapshot(self, path: str | None = None):
        """The rollout's state between blocks (every node's declared state, block index, inputs, spec identity);
        written to ``path`` as safetensors + JSON header when given. Returns the in-memory ``Snapshot``."""
        from . import snapshot as snap
        s = snap.capture(self)
        if path is not None:
            snap.write(s, path)
        return s

    def restore(self, source, **inputs: Any) -> "Session":
        """Continue from a snapshot (a path or a ``Snapshot``) of this spec; ``inputs`` override its saved run
        inputs (a new prompt, seed, ...). Refuses a snapshot of another spec, shape or dtype."""
        from . import snapshot as snap
        if self.closed:
            raise FdError("this session is closed; restore into a new one (pipeline.open_session())")
        snap.restore(self, snap.read(source) if not isinstance(source, snap.Snapshot) else source, inputs)
        return self

    def fork(self, n: int, inputs: list[dict[str, Any]] | None = None) -> list["Session"]:
        """``n`` independent sessions continuing from this one's current state, branch ``i`` with
        ``inputs[i]`` (a prompt, camera, actions) over the current inputs. This session is untouched."""
        from . import snapshot as snap
        if n < 1 or (inputs is not None and len(inputs) != n):
            raise FdError(f"fork({n}): need n >= 1 and one inputs dict per branch (got {len(inputs or [])})")
        s = snap.capture(self)
        return [Session(self.pipeline, self.inputs).restore(s, **((inputs or [{}] * n)[i])) for i in range(n)]

    # ------------------------------------------------------------------ running
    def _gather(self, name: str) -> tuple[dict[str, Any], set[str]]:
        vals, changed = {}, set()
        last = self._last_inputs.setdefault(name, {})
        for port, ref in self.plan.nodes[name].wires.items():
            v = self.inputs[ref.port] if ref.node == "inputs" else self.values[ref.node][ref.port]
            vals[port] = v
            ident = id(v) if not isinstance(v, (str, int, float, bool)) else hash((type(v), v))
            if last.get(port) != ident:
                changed.add(port)
                last[port] = ident
        return vals, changed

    def _run_node(self, name: str, block: int | None, timings: dict[str, float], timers: dict) -> None:
        node = self.nodes[name]
        if node.is_sink and self.pipeline.rank != 0:
            return
        vals, step = self._node_inputs(name, block)
        timer = NodeTimer(node.device)
        timer.start()
        try:
            out = node.run(vals, self.states[name], step) or {}
        except FdError:
            raise
        except Exception as e:
            raise NodeRuntimeError(name, self.plan.spec.node_where(name), f"running block {block}"
                                   if block is not None else "running its session phase", e) from e
        timer.stop()
        timers[name] = timer
        self.values[name] = out

    def _node_inputs(self, name: str, block: int | None) -> tuple[dict[str, Any], Step]:
        vals, changed = self._gather(name)
        return vals, Step(block=block, inputs=self.inputs, first_in_session=(self.block == 0),
                          changed=frozenset(changed))

    def _run_session_phase(self, timings, timers) -> None:
        if not self._dirty:
            return
        graph = self.plan.graph
        rerun = set(self._dirty)
        for n in list(self._dirty):
            rerun |= {d for d in _descendants(graph, n) if self.plan.nodes[d].phase == SESSION}
        for n in self.plan.session_nodes:
            if n in rerun:
                self._run_node(n, None, timings, timers)
                if self.plan.nodes[n].offload:
                    self.nodes[n].offload()
        self._dirty.clear()

    def step(self) -> BlockResult:
        """Run one autoregressive block (and, first, any session node whose inputs changed)."""
        if self.closed:
            raise FdError("this session is closed")
        timings: dict[str, float] = {}
        timers: dict[str, NodeTimer] = {}
        try:
            self._run_session_phase(timings, timers)
            for n in self.plan.block_nodes:
                self._run_node(n, self.block, timings, timers)
        except BaseException:
            self.abort()
            raise
        return self._finish_block(timings, timers)

    def _finish_block(self, timings: dict, timers: dict) -> BlockResult:
        for n, t in timers.items():
            timings[n] = t.ms()
            self.pipeline.timings_ms[n].append(timings[n])
        result = BlockResult(self.block, {n: self.values.get(n, {}) for n in self.plan.block_nodes}, timings)
        self.block += 1
        return result

    def stream(self, num_blocks: int | None = None) -> Iterator[BlockResult]:
        if num_blocks is not None:
            n = num_blocks
        elif "num_blocks" in self.inputs:
            n = self.pipeline.blocks_to_run(int(self.inputs["num_blocks"]))
        else:
            n = self.pipeline.blocks_to_run()
        for _ in range(n):
            yield self.step()

    def close(self) -> None:
        """Finish the session: sinks commit their files (atomically)."""
        if self.closed:
            return
        self.closed = True
        for n in self.plan.order:
            if self.nodes[n].is_sink and self.pipeline.rank != 0:
                continue
            self.nodes[n].close(self.states[n])
        self._release_all()

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        for n in self.plan.order:
            self.nodes[n].abort(self.states[n])
        self._release_all()

    def _release_all(self) -> None:
        for n in self.plan.order:
            self.nodes[n].release(self.states[n])

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def step_together(sessions: list[Session]) -> list[BlockResult]:
    """One block of each of several sessions of ONE pipeline (``fd serve`` batching users): session phases
    run per session; every block node gets all sessions at once through ``Node.run_batch`` (a batching node
    runs one forward for all of them). Each session's outputs equal what its own ``step()`` would give.
    A failure aborts every session of the batch (the error cannot be pinned on one of them)."""
    if not sessions:
        return []
    if len({id(s.pipeline) for s in sessions}) > 1:
        raise FdError("step_together: the sessions belong to different pipelines")
    for s in sessions:
        if s.closed:
            raise FdError("step_together: a session is closed")
    first = sessions[0]
    per = [({}, {}) for _ in sessions]          # (timings, timers) per session
    try:
        for s, (timings, timers) in zip(sessions, per):
            s._run_session_phase(timings, timers)
        for n in first.plan.block_nodes:
            node = first.nodes[n]
            if node.is_sink and first.pipeline.rank != 0:
                continue
            args = [s._node_inputs(n, s.block) for s in sessions]
            timer = NodeTimer(node.device)
            timer.start()
            try:
                outs = node.run_batch([a[0] for a in args], [s.states[n] for s in sessions], [a[1] for a in args])
            except FdError:
                raise
            except Exception as e:
                raise NodeRuntimeError(n, first.plan.spec.node_where(n), "running a batch of blocks", e) from e
            timer.stop()
            for s, out, (_, timers) in zip(sessions, outs, per):
                s.values[n] = out or {}
                timers[n] = timer
    except BaseException:
        for s in sessions:
            s.abort()
        raise
    return [s._finish_block(timings, timers) for s, (timings, timers) in zip(sessions, per)]


def _descendants(graph, n):
    import networkx as nx
    return nx.descendants(graph, n)
