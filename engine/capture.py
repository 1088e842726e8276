"""CUDA-graph dispatch: one captured graph per static shape key, replayed with copy-in inputs.

A block-phase node whose shapes depend only on a few Python ints (the attended KV
length while a cache fills, a CFG branch, the first decoder chunk or not) names
those ints as the *key*; everything that changes from call to call goes in as a
tensor argument. Per key: ``warmup`` eager calls (cuDNN/cuBLAS pick their plans,
torch.compile finishes, lazily created buffers appear), then one capture, then
replays: the arguments are copied into the graph's static input buffers and the
graph is replayed; the outputs come back from its static output buffers (cloned
by default, so a caller may keep them across calls).

All graphs of one ``GraphCache`` share ONE memory pool, so a cache that fills
block by block (7 attended lengths, then one length forever) costs about the
activations of a single forward, not seven. Sharing is safe here because calls
are sequential on one stream and each graph's outputs stay referenced by its
entry.

Off CUDA (or with ``enabled=False``) every call runs eagerly; the bookkeeping is
the same, so ``graph_status()`` reads the same on a CPU run. The backend is
pluggable so CPU tests can check the bucketing and copy-in logic with a fake one.

What a captured callable must not do: host syncs (``.item()``, printing tensors,
data-dependent Python branches), host-to-device copies of pageable memory, or
allocate tensors it keeps between calls. Tensors it reads through its closure
(weights, a KV cache, static cross-attention buffers) must keep their addresses:
write new values into them with ``copy_`` (``StaticTensors`` helps) instead of
rebinding.

A bound method ``fn`` is held weakly: the object that owns the cache usually passes
its own method, and a strong reference would make a cycle that keeps the captured
graphs' memory pools (gigabytes for a decoder chunk) alive after the session drops
its object, until Python's cyclic collector happens to run.
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch

Outputs = Any  # a tensor or a (nested) tuple/list of tensors


@dataclass
class GraphStats:
    eager: int = 0       # calls run eagerly (off CUDA, disabled, or a key still warming up)
    captured: int = 0    # graphs captured
    replayed: int = 0    # replays (the call right after a capture included)

    def describe(self) -> str:
        if not self.captured:
            return f"eager ({self.eager} calls)"
        return f"captured {self.captured} graphs, replayed {self.replayed} times, {self.eager} eager calls"


@dataclass
class _Entry:
    graph: Any
    inputs: tuple[torch.Tensor, ...]
    outputs: Outputs
    replays: int = 0


def _map(fn, out: Outputs) -> Outputs:
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_map(fn, o) for o in out)
    if out is None:
        return None
    raise TypeError(f"a captured callable must return tensors, got {type(out).__name__}")


class CudaGraphBackend:
    """torch.cuda graphs, all captured into one shared pool; warmup runs on a side stream."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.pool = torch.cuda.graph_pool_handle()
        self.side = torch.cuda.Stream(self.device)

    def warm(self, fn: Callable, args: tuple) -> Outputs:
        main = torch.cuda.current_stream(self.device)
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            out = fn(*args)
        main.wait_stream(self.side)
        _map(lambda t: t.record_stream(main), out)
        return out

    def capture(self, fn: Callable, args: tuple) -> tuple[Any, Outputs]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn(*args)
        return graph, out

    def replay(self, graph) -> None:
        graph.replay()


class EagerBackend:
    """Stand-in with graph semantics on any device, for CPU tests of the dispatch: 'capture' runs
    the call once (as a real capture plus its first replay would, side effects included) and
    remembers it; later 'replays' re-run it and write into the same output tensors."""

    def __init__(self):
        self.calls: list[str] = []

    def warm(self, fn, args):
        self.calls.append("warm")
        return fn(*args)

    def capture(self, fn, args):
        self.calls.append("capture")
        out = fn(*args)
        return [fn, args, out, True], out

    def replay(self, graph) -> None:
        self.calls.append("replay")
        fn, args, out, just_captured = graph
        if just_captured:  # the capture already did this replay's work
            graph[3] = False
            return
        _pairs(lambda dst, src: dst.copy_(src), out, fn(*args))


def _pairs(fn, a: Outputs, b: Outputs) -> None:
    if isinstance(a, torch.Tensor):
        fn(a, b)
    elif isinstance(a, (tuple, list)):
        for x, y in zip(a, b):
            _pairs(fn, x, y)


class GraphCache:
    """Captured graphs of one callable ``fn(*tensors) -> tensors``, one per static key.

    ``cache(key, *tensors)`` runs ``fn(*tensors)``: eagerly for the first ``warmup``
    calls of a key, then captured and replayed. Tensors must have the same shapes,
    dtypes and devices for a key (checked on replay). ``clone_outputs=False`` returns
    the graph's own output buffers: cheaper, but the next replay of that key overwrites
    them.
    """

    def __init__(self, fn: Callable[..., Outputs], device: str | torch.device = "cpu", *,
                 enabled: bool = True, warmup: int = 1, clone_outputs: bool = True,
                 backend: Any = None, name: str = ""):
        self._fn = weakref.WeakMethod(fn) if inspect.ismethod(fn) else (lambda: fn)
        self.name = name
        self.warmup = warmup
        self.clone_outputs = clone_outputs
        if backend is None and enabled and str(device).startswith("cuda") and torch.cuda.is_available():
            backend = CudaGraphBackend(device)
        self.backend = backend if enabled else None
        self.entries: dict[Hashable, _Entry] = {}
        self.warm_calls: dict[Hashable, int] = {}
        self.stats = GraphStats()

    @property
    def fn(self) -> Callable[..., Outputs]:
        fn = self._fn()
        if fn is None:
            raise RuntimeError(f"graph cache {self.name!r}: the object whose method it runs was freed")
        return fn

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    def clear(self) -> None:
        """Drop every graph (e.g. after a buffer the graphs read through their closure moved)."""
        self.entries.clear()
        self.warm_calls.clear()

    def __call__(self, key: Hashable, *args: torch.Tensor, **named: torch.Tensor | None) -> Outputs:
        """Run ``fn(*args, **named)``; named tensors are copied in by name (None values are passed as
        None and are part of what the key must pin down)."""
        names = tuple(k for k, v in named.items() if v is not None)
        flat = args + tuple(named[k] for k in names)
        nones = {k: None for k, v in named.items() if v is None}

        def call(*tensors):
            return self.fn(*tensors[:len(args)], **dict(zip(names, tensors[len(args):])), **nones)

        if self.backend is None:
            self.stats.eager += 1
            return call(*flat)
        entry = self.entries.get(key)
        if entry is None:
            if self.warm_calls.get(key, 0) < self.warmup:
                self.warm_calls[key] = self.warm_calls.get(key, 0) + 1
                self.stats.eager += 1
                return self.backend.warm(call, flat)
            static = tuple(a.clone() for a in flat)
            graph, out = self.backend.capture(call, static)
            entry = self.entries[key] = _Entry(graph, static, out)
            self.stats.captured += 1
        else:
            for dst, src in zip(entry.inputs, flat):
                if dst.shape != src.shape or dst.dtype != src.dtype or dst.device != src.device:
                    raise ValueError(f"graph {self.name or ''} key {key!r}: input {tuple(src.shape)} "
                                     f"{src.dtype} does not match the captured {tuple(dst.shape)} {dst.dtype}")
        for dst, src in zip(entry.inputs, flat):
            if dst is not src:
                dst.copy_(src)
        self.backend.replay(entry.graph)
        entry.replays += 1
        self.stats.replayed += 1
        return _map(torch.clone, entry.outputs) if self.clone_outputs else entry.outputs

    def status(self) -> str:
        """What ``graph_status()`` reports: e.g. 'captured 8 graphs, replayed 123 times, 8 eager calls'."""
        text = self.stats.describe()
        return text if self.enabled or not self.stats.eager else f"eager ({self.stats.eager} calls, graphs off)"


@dataclass
class StaticTensors:
    """Named device buffers with fixed addresses that captured graphs read through their closure.

    ``put(name, value)`` copies ``value`` into the buffer (allocating it the first time, or
    when shape/dtype/device change, which returns True so the caller can ``clear()`` its
    graphs). A prompt switch thus becomes a ``copy_`` into the same cross-attention buffers,
    never a re-capture.
    """
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def put(self, name: str, value: torch.Tensor) -> bool:
        buf = self.buffers.get(name)
        if buf is None or buf.shape != value.shape or buf.dtype != value.dtype or buf.device != value.device:
            self.buffers[name] = value.detach().clone()
            return True
        if buf.data_ptr() != value.data_ptr():
            buf.copy_(value)
        return False

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.buffers[name]

