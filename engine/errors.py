"""User-facing errors: each one names where in which file, which node and which field.

The CLI prints these and exits 2; it never shows a traceback for a user mistake.
Several are collected and reported at once, like ComfyUI's per-node validation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Location:
    file: str
    line: int | None = None    # 1-based
    column: int | None = None  # 1-based

    def __str__(self) -> str:
        s = self.file
        if self.line is not None:
            s += f":{self.line}"
            if self.column is not None:
                s += f":{self.column}"
        return s


@dataclass(frozen=True)
class Related:
    """A second place an error involves: the other side of a merge, the ``extends:`` line that pulled a
    file in, the value an interpolation reads. One location is rarely enough once specs are layered."""
    location: Location
    why: str

    def __str__(self) -> str:
        return f"see {self.location} ({self.why})"


@dataclass(frozen=True)
class SpecError:
    code: str                  # machine-readable class, e.g. "unknown_node_type"
    message: str
    location: Location
    node: str | None = None
    field: str | None = None
    hint: str | None = None
    related: tuple[Related, ...] = ()

    def __str__(self) -> str:
        where = f"{self.location}"
        who = f" [{self.node}{'.' + self.field if self.field else ''}]" if self.node else (
            f" [{self.field}]" if self.field else "")
        s = f"{where}:{who} {self.message}"
        if self.hint:
            s += f" ({self.hint})"
        for r in self.related:
            s += f"; {r}"
        return s

    def with_related(self, *more: Related) -> "SpecError":
        seen = set(self.related)
        extra = tuple(r for r in more if r not in seen and r.location != self.location)
        return replace(self, related=self.related + extra) if extra else self

    def to_json(self) -> dict:
        d = asdict(self)
        loc = d.pop("location")
        d.update(file=loc["file"], line=loc["line"], column=loc["column"])
        d["related"] = [{"why": r.why, "file": r.location.file, "line": r.location.line,
                         "column": r.location.column} for r in self.related]
        return d


class FdError(Exception):
    """Base of every error the CLI reports without a traceback (exit code 2)."""


class SpecErrors(FdError):
    def __init__(self, errors: list[SpecError]):
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


class NodeRuntimeError(FdError):
    """A node failed while loading or running; names the node and the spec location."""

    def __init__(self, node: str, where: Location | None, what: str, cause: BaseException):
        self.node, self.where, self.cause = node, where, cause
        loc = f"{where}: " if where else ""
        super().__init__(f"{loc}node {node!r} failed while {what}: {type(cause).__name__}: {cause}")


def close_matches(word: str, options, n: int = 3, cutoff: float = 0.5) -> list[str]:
    """The options a typo most likely meant (the one "did you mean" of every message)."""
    import difflib
    return difflib.get_close_matches(str(word), list(options), n=n, cutoff=cutoff)


def did_you_mean(word: str, options, cutoff: float = 0.5) -> str | None:
    m = close_matches(word, options, cutoff=cutoff)
    return f"did you mean {', '.join(m)}?" if m else None
