"""Merging spec layers and naming the places a merge or an interpolation breaks.

Split from spec.py: omegaconf reports a list-over-mapping merge as a bare ``TypeError`` and an interpolation
failure at the line that reads the value; these helpers find the key path and every line involved (the
child's value, the parent's key, the ``${...}`` that reads it) so the error names the user's own file.
"""
from __future__ import annotations

import re
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import Location, Related, SpecError, SpecErrors

Path_ = tuple

def overlay_locs(base: dict, over: dict, over_data: Any) -> dict:
    """Locations after a merge: ``over`` wins, and where ``over`` puts a scalar or a list, the base's
    locations below that key are dropped (they describe values the merge threw away)."""
    out = dict(base)
    for p in over:
        try:
            v = _dig(over_data, p)
        except (KeyError, IndexError, TypeError):
            continue
        if not isinstance(v, dict):
            for q in [q for q in out if len(q) > len(p) and q[:len(p)] == p]:
                del out[q]
    out.update(over)
    return out


def create(data: dict, locs: dict, file: str):
    """``OmegaConf.create`` that names the line of an interpolation it cannot even parse (``"${"``)."""
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException:
        pass
    errors = []

    def walk(v, path):
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, x in items:
            p = path + (str(k) if isinstance(v, dict) else k,)
            if isinstance(x, str) and "$" in x:
                try:
                    OmegaConf.create({"v": x})
                except OmegaConfBaseException as e:
                    errors.append(SpecError("bad_interpolation", f"{'.'.join(map(str, p))}: {x!r} is not a valid "
                                            f"interpolation: {str(e).splitlines()[0]}", best(locs, p) if locs
                                            else Location(file, 1, 1), field=".".join(map(str, p)),
                                            hint="write ${section.key}, or escape a literal as \\${"))
            walk(x, p)

    walk(data, ())
    raise SpecErrors(errors or [SpecError("bad_spec", "omegaconf cannot read this spec", Location(file, 1, 1))])


def plain(cfg) -> Any:
    return OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg


def _container_conflict(a, b, path: Path_ = ()) -> Path_ | None:
    """The first key path where one side holds a mapping and the other a list (omegaconf cannot merge those)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in b:
            if k in a:
                found = _container_conflict(a[k], b[k], path + (str(k),))
                if found is not None:
                    return found
        return None
    if isinstance(a, (dict, list)) and isinstance(b, (dict, list)) and type(a) is not type(b):
        return path
    return None


def kind(v) -> str:
    return "a mapping" if isinstance(v, dict) else "a list"


def _dig(d, path):
    for k in path:
        d = d[k]
    return d


def merge(base, over, base_locs: dict, over_locs: dict, how: str, over_where: Location | None = None):
    """``OmegaConf.merge`` that turns a list-over-mapping clash into a spec error naming both places."""
    try:
        return OmegaConf.merge(base, over)
    except (TypeError, OmegaConfBaseException) as e:
        a, b = plain(base), plain(over)
        path = _container_conflict(a, b)
        if path is None:
            raise SpecErrors([SpecError("incompatible_merge", f"{how}: cannot merge: {str(e).splitlines()[0]}",
                                        over_where or Location("<merge>"))]) from None
        key = ".".join(path) or "<top>"
        here = over_where or best(over_locs, path)
        raise SpecErrors([SpecError(
            "incompatible_merge", f"{how}: {key} is {kind(_dig(b, path))} here but {kind(_dig(a, path))} in "
            "the spec it is merged over", here, field=key, related=(Related(best(base_locs, path), "merged over"),),
            hint="write the same kind of value (a mapping where the base has a mapping, a list where it has a list)"
        )]) from None


def best(locs: dict, path: Path_) -> Location:
    p = tuple(path)
    while p:
        if p in locs:
            return locs[p]
        p = p[:-1]
    any_loc = next(iter(locs.values()), None)
    return Location(any_loc.file, 1, 1) if any_loc else Location("<unknown>")


_REF_RE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


def interpolation_error(node, k, p, e, locs, file) -> SpecError:
    """Name the interpolation's line and the line of every value it reads; when those lie in different files
    (a child's ``inputs: 3`` breaking a parent's ``${inputs.num_blocks}``), lead with the child's."""
    msg = str(e).splitlines()[0]
    key = ".".join(map(str, p))
    site = locs.get(p, Location(file, 1, 1))
    try:
        text = node._get_node(k)._value()
    except Exception:   # noqa: BLE001 - omegaconf internals; fall back to the site alone
        text = None
    refs = _REF_RE.findall(text) if isinstance(text, str) else []
    read = [(r, best(locs, tuple(r.split(".")))) for r in refs]
    elsewhere = [(r, loc) for r, loc in read if loc.file != site.file]
    if elsewhere:
        r, loc = elsewhere[0]
        return SpecError("bad_interpolation", f"{r} (read by {key}: {text}) cannot be resolved: {msg}", loc,
                         field=key, related=(Related(site, f"the interpolation {text}"),))
    return SpecError("bad_interpolation", f"cannot resolve {key}: {msg}", site, field=key,
                     related=tuple(Related(loc, f"{r} is set") for r, loc in read if loc != site and
                                   tuple(r.split(".")) in locs))


def nest(path: Path_, value) -> dict:
    for k in reversed(path):
        value = {k: value}
    return value
