"""Reading a spec: YAML + ``extends:`` + ``--set`` files + dotlist overrides, with source locations.

omegaconf does the merging and ``${...}`` interpolation; PyYAML's composer gives
every key its file/line/column so that validation can point at the exact place a
person has to edit. Nothing here knows about node types: that is validate.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import Location, Related, SpecError, SpecErrors, did_you_mean
from .spec_merge import best, create, interpolation_error, kind, merge, nest, overlay_locs, plain

TOP_LEVEL_KEYS = ("name", "description", "extends", "inputs", "nodes", "sinks")
NODE_FIELDS = ("type", "params", "params_by_type", "in", "device", "parallel", "capture", "offload", "main", "doc")
Path_ = tuple  # a key path like ("nodes", "dit", "params", "dim")


@dataclass(frozen=True)
class Ref:
    """A wire's source: ``node.port`` or ``inputs.name``."""
    node: str   # "inputs" for run inputs
    port: str

    def __str__(self) -> str:
        return f"{self.node}.{self.port}"


@dataclass
class NodeSpec:
    name: str
    type: Any
    params: dict
    wires: dict[str, Any]          # port -> "node.port" string as written
    device: Any = "auto"
    parallel: Any = None
    capture: Any = "auto"
    offload: Any = False
    main: Any = False
    is_sink: bool = False
    raw: dict = field(default_factory=dict)

    @property
    def section(self) -> str:
        return "sinks" if self.is_sink else "nodes"


@dataclass
class Spec:
    name: str
    description: str
    file: str
    inputs: dict[str, Any]
    nodes: dict[str, NodeSpec]        # sinks included (is_sink=True), in file order
    raw: dict
    locations: dict[Path_, Location]
    via: dict[str, tuple[Related, ...]] = field(default_factory=dict)   # file -> how it was pulled in

    def annotate(self, errors: list[SpecError]) -> list[SpecError]:
        """Errors located in a file the user did not name get the ``extends:``/``--set`` chain that reached it."""
        return self.annotate_with(self.via, errors)

    @staticmethod
    def annotate_with(via: dict, errors: list[SpecError]) -> list[SpecError]:
        return [e.with_related(*via.get(e.location.file, ())) for e in errors]

    def where(self, *path) -> Location:
        """Best location for ``path``: the deepest prefix that has one."""
        p = tuple(path)
        while p:
            if p in self.locations:
                return self.locations[p]
            p = p[:-1]
        return Location(self.file, 1, 1)   # nothing more precise: the top of the file the user named

    def node_where(self, node: str, *path) -> Location:
        ns = self.nodes.get(node)
        section = ns.section if ns else "nodes"
        if ns is not None and len(path) == 2 and path[0] == "params" and (section, node, *path) not in self.locations:
            alt = (section, node, "params_by_type", str(ns.type), path[1])
            if alt in self.locations:
                return self.locations[alt]
        return self.where(section, node, *path)


# --------------------------------------------------------------------------- locations
def _compose_locations(text: str, file: str) -> dict[Path_, Location]:
    root = yaml.compose(text)
    locs: dict[Path_, Location] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = path + (str(k.value),)
                locs[p] = Location(file, k.start_mark.line + 1, k.start_mark.column + 1)
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = path + (i,)
                locs[p] = Location(file, v.start_mark.line + 1, v.start_mark.column + 1)
                walk(v, p)

    if root is not None:
        walk(root, ())
    return locs


def _read_yaml(path: Path) -> tuple[dict, dict[Path_, Location]]:
    file = str(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecErrors([SpecError("unreadable_spec", f"cannot read spec: {e.strerror}", Location(file))])
    except UnicodeDecodeError:
        raise SpecErrors([SpecError("unreadable_spec", "not a text file, so not a YAML spec", Location(file))])
    try:
        data = yaml.safe_load(text)
        locs = _compose_locations(text, file)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file)
        msg = getattr(e, "problem", None) or str(e)
        raise SpecErrors([SpecError("yaml_syntax", f"YAML syntax error: {msg}", loc)])
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecErrors([SpecError("bad_spec", "a spec must be a mapping (name:, inputs:, nodes:, sinks:)",
                                    Location(file, 1, 1))])
    return data, locs


# --------------------------------------------------------------------------- finding specs
def packaged_spec_dir() -> Path:
    return Path(str(resources.files("specs")))


def packaged_spec_names() -> list[str]:
    return sorted(p.stem for p in packaged_spec_dir().glob("*.yaml"))


def find_spec(ref: str | Path, relative_to: Path | None = None) -> Path:
    """A path, or a bare name of a packaged spec (``self_forcing`` -> specs/self_forcing.yaml)."""
    p = Path(ref).expanduser()
    candidates = [p]
    if relative_to is not None and not p.is_absolute():
        candidates.insert(0, relative_to / p)
    if p.suffix not in (".yaml", ".yml") and len(p.parts) == 1:   # a bare name (may contain dots: wan21_t2v_1.3b)
        candidates.append(packaged_spec_dir() / f"{p.name}.yaml")
    for c in candidates:
        if c.is_file():
            return c
    hint = did_you_mean(str(ref), packaged_spec_names(), cutoff=0.6) or \
        f"packaged specs: {', '.join(packaged_spec_names())}"
    raise SpecErrors([SpecError("spec_not_found", f"no spec file or packaged spec named {str(ref)!r}",
                                Location(str(ref)), hint=hint)])


# --------------------------------------------------------------------------- loading
_NOT_A_SPEC = ("unreadable_spec", "yaml_syntax", "bad_spec")


def _load_with_extends(path: Path, chain: tuple[Path, ...] = (), via: dict | None = None,
                       reached_by: tuple[Related, ...] = ()) -> tuple[Any, dict[Path_, Location]]:
    """Load ``path`` and its ``extends:`` ancestors, merged. ``via`` collects, per file, the ``extends:``
    lines (nearest first) that pulled it in, so later errors in a parent can name the user's own file."""
    path = path.resolve()
    via = {} if via is None else via
    if reached_by:
        via.setdefault(str(path), reached_by)
    if path in chain:
        names = " -> ".join(str(p) for p in chain + (path,))
        where = reached_by[0].location if reached_by else Location(str(path), 1, 1)
        raise SpecErrors([SpecError("extends_cycle", f"extends: forms a cycle: {names}", where, field="extends",
                                    related=reached_by[1:])])
    data, locs = _read_yaml(path)
    parent_ref = data.pop("extends", None)
    cfg = create(data, locs, str(path))
    if parent_ref is None:
        return cfg, locs
    ext_at = locs.get(("extends",), Location(str(path), 1, 1))
    if not isinstance(parent_ref, str):
        raise SpecErrors([SpecError("bad_extends", "extends: must be a spec path or name", ext_at, field="extends",
                                    related=reached_by)])
    try:
        parent_path = find_spec(parent_ref, relative_to=path.parent)
    except SpecErrors as e:
        err = e.errors[0]
        raise SpecErrors([SpecError("extends_not_found", err.message, ext_at, field="extends", hint=err.hint,
                                    related=reached_by)])
    here = (Related(ext_at, f"reached through `extends: {parent_ref}`"),) + reached_by
    try:
        parent_cfg, parent_locs = _load_with_extends(parent_path, chain + (path,), via, here)
    except SpecErrors as e:
        bad = e.errors[0]
        if len(e.errors) == 1 and bad.code in _NOT_A_SPEC and bad.location.file == str(parent_path.resolve()):
            raise SpecErrors([SpecError("extends_not_a_spec", f"extends: {parent_ref} is not a spec: {bad.message}",
                                        ext_at, field="extends", related=(Related(bad.location, "the target"),)
                                        + reached_by)]) from None
        raise
    if parent_cfg and not any(k in TOP_LEVEL_KEYS for k in parent_cfg):
        raise SpecErrors([SpecError("extends_not_a_spec", f"extends: {parent_ref} is not a spec: it has none of "
                                    f"the sections {', '.join(TOP_LEVEL_KEYS)}", ext_at, field="extends",
                                    related=(Related(Location(str(parent_path.resolve()), 1, 1), "the target"),)
                                    + reached_by)])
    merged = merge(parent_cfg, cfg, parent_locs, locs, "extends")
    return merged, overlay_locs(parent_locs, locs, data)


def _check_override_path(cfg, key: str, where: Location) -> SpecError | None:
    parts = list(_split_key(key))
    if parts[0] not in TOP_LEVEL_KEYS:
        return SpecError("unknown_override", f"override {key!r}: no top-level section {parts[0]!r}", where,
                         hint=f"sections: {', '.join(TOP_LEVEL_KEYS)}")
    if parts[0] in ("inputs",) and len(parts) >= 2 and parts[1] not in (cfg.get("inputs") or {}):
        near = did_you_mean(parts[1], list(cfg.get("inputs") or {}))
        return SpecError("unknown_override", f"override {key!r}: the spec has no input {parts[1]!r}", where,
                         field=key, hint=near)
    if parts[0] in ("nodes", "sinks") and len(parts) >= 2:
        section = cfg.get(parts[0]) or {}
        if parts[1] not in section:
            return SpecError("unknown_override", f"override {key!r}: the spec has no {parts[0][:-1]} {parts[1]!r}",
                             where, field=key, hint=did_you_mean(parts[1], list(section)))
        if len(parts) >= 3 and parts[2] not in NODE_FIELDS:
            return SpecError("unknown_override", f"override {key!r}: {parts[2]!r} is not a node field", where,
                             node=parts[1], field=parts[2], hint=f"fields: {', '.join(NODE_FIELDS)}")
    return None


def _split_key(key: str) -> Path_:
    """``nodes.decoder.params_by_type.taehv\\.decode`` -> (..., "taehv.decode"): omegaconf's escaped dots."""
    return tuple(part.replace("\0", ".") for part in key.replace("\\.", "\0").split("."))


def load_spec(ref: str | Path, overrides: list[str] = (), set_files: list[str | Path] = ()) -> Spec:
    """Read a spec (path or packaged name), merge ``--set`` files and dotlist overrides, resolve ``${...}``.
    Every error located in a file the user did not name also names the ``extends:``/``--set`` chain."""
    via: dict[str, tuple[Related, ...]] = {}
    try:
        return _load_spec(ref, overrides, set_files, via)
    except SpecErrors as e:
        raise SpecErrors(Spec.annotate_with(via, e.errors)) from None


def _load_spec(ref, overrides, set_files, via) -> Spec:
    path = find_spec(ref)
    cfg, locs = _load_with_extends(path, via=via)
    for i, f in enumerate(set_files):
        fp = find_spec(f)
        by = (Related(Location(f"<--set {i + 1}: {f}>"), "this file came in through --set"),)
        extra, extra_locs = _load_with_extends(fp, via=via, reached_by=by)
        via.setdefault(str(fp.resolve()), by)
        cfg = merge(cfg, extra, locs, extra_locs, f"--set {f}")
        locs = overlay_locs(locs, extra_locs, plain(extra))
    errors: list[SpecError] = []
    for i, ov in enumerate(overrides):
        where = Location(f"<override {i + 1}: {ov}>")
        if "=" not in ov:
            hint = "to merge a YAML file over the spec, use --set " + ov if ov.endswith((".yaml", ".yml")) else None
            errors.append(SpecError("bad_override", f"override {ov!r} must look like key.path=value", where,
                                    hint=hint))
            continue
        key, value_text = ov.split("=", 1)
        err = _check_override_path(cfg, key.strip(), where)
        if err:
            errors.append(err)
            continue
        try:
            value = yaml.safe_load(value_text) if value_text.strip() else ""
        except yaml.YAMLError:
            value = value_text
        try:
            if isinstance(value, (str, dict, list)):
                create({"v": value}, {}, where.file)
        except SpecErrors as e:
            errors.extend(SpecError(x.code, f"override {ov!r}: {x.message}", where, field=key.strip(), hint=x.hint)
                          for x in e.errors)
            continue
        try:
            OmegaConf.update(cfg, key.strip(), value, merge=True, force_add=True)
        except (TypeError, OmegaConfBaseException) as e:
            kp = _split_key(key.strip())
            old = OmegaConf.select(cfg, key.strip(), default=None)
            what = f"{kind(value)} over {kind(plain(old))}" if isinstance(value, (dict, list)) and \
                isinstance(plain(old), (dict, list)) else str(e).splitlines()[0]
            errors.append(SpecError("incompatible_merge", f"override {key.strip()!r}: cannot merge {what}", where,
                                    field=key.strip(), related=(Related(best(locs, kp), "merged over"),)))
            continue
        kp = _split_key(key.strip())
        locs = overlay_locs(locs, {kp: where}, {kp[0]: value} if len(kp) == 1 else nest(kp, value))
    top = str(path)
    if errors:
        raise SpecErrors(errors)
    data = _resolve(cfg, locs, top)
    spec = _build(data, locs, top)
    spec.via = via
    return spec


def _resolve(cfg, locs, file) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:
        pass
    errors = []

    def walk(node, path):
        for k in list(node.keys()) if OmegaConf.is_dict(node) else range(len(node)):
            p = path + (str(k) if OmegaConf.is_dict(node) else k,)
            try:
                child = node[k]
            except OmegaConfBaseException as e:
                errors.append(interpolation_error(node, k, p, e, locs, file))
                continue
            if OmegaConf.is_config(child):
                walk(child, p)

    walk(cfg, ())
    raise SpecErrors(errors or [SpecError("bad_interpolation", "cannot resolve interpolations",
                                          Location(file, 1, 1))])


def _build(data: dict, locs: dict, file: str) -> Spec:
    nodes: dict[str, NodeSpec] = {}
    for section in ("nodes", "sinks"):
        for name, body in (data.get(section) or {}).items() if isinstance(data.get(section), dict) else []:
            body = body if isinstance(body, dict) else {}
            by_type = body.get("params_by_type") or {}
            typed = by_type.get(body.get("type")) if isinstance(by_type, dict) and isinstance(body.get("type"),
                                                                                              str) else None
            params = dict(typed) if isinstance(typed, dict) else {}   # a wrong kind is validate.py's to report
            params.update(body.get("params") or {} if isinstance(body.get("params") or {}, dict) else {})
            nodes[str(name)] = NodeSpec(
                name=str(name), type=body.get("type"),
                params=params, wires=body.get("in") or {},
                device=body.get("device", "auto"), parallel=body.get("parallel"),
                capture=body.get("capture", "auto"), offload=body.get("offload", False),
                main=body.get("main", False), is_sink=(section == "sinks"), raw=body)
    inputs = data.get("inputs") or {}
    return Spec(name=str(data.get("name") or Path(file).stem), description=str(data.get("description") or ""),
                file=file, inputs=inputs if isinstance(inputs, dict) else {}, nodes=nodes, raw=data,
                locations=locs)


def parse_ref(text: Any) -> Ref | None:
    if not isinstance(text, str) or "." not in text:
        return None
    node, port = text.split(".", 1)
    return Ref(node, port) if node and port else None
