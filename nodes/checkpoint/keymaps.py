"""Declarative checkpoint key renaming: one table of rules per layout.

A rule ``("blocks.{i}.attn1.to_q", "blocks.{i}.self_attn.q")`` renames every
key that starts with the pattern's dotted components: ``blocks.3.attn1.to_q.weight``
becomes ``blocks.3.self_attn.q.weight``. A ``{name}`` placeholder matches exactly
one key component; a pattern only matches whole components (``to_q`` never
matches ``to_qkv``). The first matching rule wins and is applied once, so
swaps such as diffusers' norm2 <-> norm3 need no placeholder tricks. Keys no
rule matches are kept; a rule whose replacement is None drops the key (e.g.
tensors a layout stores that the other has no use for).

Keeping every layout difference in such a table (instead of string hacks next
to each model) makes the maps testable in both directions with ``invert``.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import CheckpointError

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Rule:
    pattern: str
    replacement: str | None  # None: drop the key

    def __post_init__(self):
        names = _PLACEHOLDER.findall(self.pattern)
        if len(set(names)) != len(names):
            raise ValueError(f"keymap rule {self.pattern!r}: a placeholder appears twice")
        if self.replacement is not None:
            missing = set(_PLACEHOLDER.findall(self.replacement)) - set(names)
            if missing:
                raise ValueError(f"keymap rule {self.pattern!r} -> {self.replacement!r}: "
                                 f"placeholders {sorted(missing)} are not in the pattern")
        regex = "".join(
            f"(?P<{part[1:-1]}>[^.]+)" if _PLACEHOLDER.fullmatch(part) else re.escape(part)
            for part in re.split(r"(\{[A-Za-z_][A-Za-z0-9_]*\})", self.pattern) if part)
        object.__setattr__(self, "_regex", re.compile(f"^{regex}(?=\\.|$)"))

    def match(self, key: str) -> str | None | bool:
        """The renamed key, None when the rule drops it, False when the rule does not match."""
        m = self._regex.match(key)  # type: ignore[attr-defined]
        if m is None:
            return False
        if self.replacement is None:
            return None
        return _PLACEHOLDER.sub(lambda g: m.group(g.group(1)), self.replacement) + key[m.end():]


@dataclass(frozen=True)
class KeyMap:
    """An ordered table of rules; ``name`` says which layout it converts, for messages."""
    name: str
    rules: tuple[Rule, ...]

    def rename(self, key: str) -> str | None:
        """``key`` after the first matching rule (unchanged when none matches; None when dropped)."""
        for rule in self.rules:
            out = rule.match(key)
            if out is not False:
                return out
        return key

    def rename_keys(self, keys: Iterable[str]) -> dict[str, str]:
        """Map new key -> old key for all ``keys``; two keys landing on one name is an error."""
        out: dict[str, str] = {}
        for old in keys:
            new = self.rename(old)
            if new is None:
                continue
            if new in out:
                raise CheckpointError(f"keymap {self.name!r} maps both {out[new]!r} and {old!r} to {new!r}")
            out[new] = old
        return out


def keymap(name: str, rules: Iterable[tuple[str, str | None]]) -> KeyMap:
    """Build a KeyMap from ``(pattern, replacement)`` pairs."""
    return KeyMap(name, tuple(Rule(p, r) for p, r in rules))


def apply(km: KeyMap | None, sd: Mapping[str, Any]) -> Mapping[str, Any]:
    """Rename the keys of ``sd`` with ``km``.

    A plain mapping gives a new dict holding the same tensor objects; a lazy
    source with a ``renamed(new_to_old)`` method (``load.Checkpoint``) stays lazy,
    so no tensor is read here.
    """
    if km is None:
        return sd
    names = km.rename_keys(sd.keys())
    if hasattr(sd, "renamed"):
        return sd.renamed(names)
    return {new: sd[old] for new, old in names.items()}


def invert(km: KeyMap, name: str | None = None) -> KeyMap:
    """The reverse table. Drop rules have no reverse and are left out."""
    rules = []
    for r in km.rules:
        if r.replacement is None:
            continue
        if set(_PLACEHOLDER.findall(r.replacement)) != set(_PLACEHOLDER.findall(r.pattern)):
            raise ValueError(f"keymap {km.name!r}: rule {r.pattern!r} -> {r.replacement!r} "
                             "cannot be inverted (placeholders differ)")
        rules.append(Rule(r.replacement, r.pattern))
    return KeyMap(name or f"inverse of {km.name}", tuple(rules))
