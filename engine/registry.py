"""Which node types exist: the built-ins plus whatever third-party packages register.

A third-party package registers node types through the ``fd.nodes`` entry-point
group; the entry point names either a Node subclass or a zero-argument callable
returning an iterable of them. No global table: callers build a ``Registry``
and pass it along.
"""
from __future__ import annotations

from importlib import metadata
from typing import Iterable

from .errors import close_matches
from .node import Node

ENTRY_POINT_GROUP = "fd.nodes"


class Registry:
    def __init__(self, node_types: Iterable[type[Node]] = ()):
        self._types: dict[str, type[Node]] = {}
        for t in node_types:
            self.add(t)

    def add(self, node_type: type[Node]) -> None:
        if not node_type.type_name:
            raise ValueError(f"{node_type.__name__} has no type_name")
        prior = self._types.get(node_type.type_name)
        if prior is not None and prior is not node_type:
            raise ValueError(f"node type {node_type.type_name!r} registered twice "
                             f"({prior.__module__}.{prior.__name__} and {node_type.__module__}.{node_type.__name__})")
        self._types[node_type.type_name] = node_type

    def get(self, name: str) -> type[Node] | None:
        return self._types.get(name)

    def names(self) -> list[str]:
        return sorted(self._types)

    def suggest(self, name: str) -> list[str]:
        return close_matches(name, self.names())

    def __contains__(self, name: str) -> bool:
        return name in self._types

    def __iter__(self):
        return iter(self._types[n] for n in self.names())

    @classmethod
    def default(cls) -> "Registry":
        """Every node type installed through the ``fd.nodes`` entry point group, fd's own built-ins
        included (pyproject.toml registers them like any third-party package), so the engine never
        imports a node package by name."""
        reg = cls()
        eps = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (ep.value.split(":")[0] != "nodes",
                                                                                        ep.name))
        if not any(ep.value.split(":")[0] == "nodes" for ep in eps):
            from .errors import FdError
            raise FdError("fd's built-in node types are not registered: install the package (`pip install -e .` in "
                          "a checkout) so that its `fd.nodes` entry point exists")
        for ep in eps:
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, Node):
                reg.add(obj)
            else:
                for t in obj():
                    reg.add(t)
        return reg
