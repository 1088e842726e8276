"""Session snapshots: the whole state of a rollout in one file, restored or forked later.

A snapshot is what the next block depends on and nothing else: every non-sink node's state as its
type declares it (``Node.state_tensors``: KV caches, RNG states, block indices, decoder memory),
the session's block counter and its run inputs. Tensors go into one safetensors file; a JSON
header (safetensors metadata key ``fd``) names the spec it came from, every tensor's shape and
dtype, and the JSON values. Sinks are not saved: a restored session writes new outputs.

Why the spec identity is the non-sink nodes' types and params: those decide every state shape and
what a block computes, so a snapshot of another spec, latent size or dtype is refused up front with
the differing fields named, instead of failing deep inside a node or, worse, running on quietly.
Run inputs (the prompt, the seed) are not part of it: changing them on resume is the point.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import FdError
from .files import AtomicPath

# Sessions and plans are passed in untyped: engine.session imports this module, never the reverse.

FORMAT = "fd-session/1"
JSON_TYPES = (type(None), bool, int, float, str)


@dataclass
class Snapshot:
    """A session's state in memory: the JSON header and the tensors (CPU, by ``node/field`` key)."""
    header: dict
    tensors: dict[str, torch.Tensor]
    source: str = "<memory>"

    def node_values(self, node: str) -> dict[str, Any]:
        """One node's state as ``state_tensors`` returned it: its JSON values and tensors under one dict."""
        values = dict(self.header["nodes"].get(node, {}))
        prefix = node + "/"
        values.update({k[len(prefix):]: t for k, t in self.tensors.items() if k.startswith(prefix)})
        return values


def spec_identity(plan) -> dict:
    """The spec name and its non-sink nodes' types and params, with a fingerprint of them."""
    nodes = {n: {"type": plan.nodes[n].type_name, "params": _jsonable(dict(plan.nodes[n].params))}
             for n in plan.order if not plan.nodes[n].is_sink}
    text = json.dumps(nodes, sort_keys=True, default=str)
    return {"name": plan.spec.name, "file": str(plan.spec.file), "nodes": nodes,
            "fingerprint": hashlib.sha256(text.encode()).hexdigest()[:16]}


def _jsonable(value: Any) -> Any:
    """Params as JSON would round-trip them (tuples become lists), so fingerprints compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _is_json(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return isinstance(value, JSON_TYPES)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """One fresh contiguous CPU copy (a GPU KV cache is copied once, not twice)."""
    return t.detach().to("cpu", copy=True).contiguous()


# ---------------------------------------------------------------------------------------------- taking
def capture(session) -> Snapshot:
    """The session's state now (between blocks), copied to the CPU."""
    plan = session.plan
    if plan.world_size > 1:
        raise FdError(f"{plan.spec.file}: snapshots of a context-parallel session (world size "
                      f"{plan.world_size}) are not supported: each rank holds only its share of the KV cache")
    tensors: dict[str, torch.Tensor] = {}
    nodes: dict[str, dict] = {}
    for n in plan.order:
        node = session.nodes[n]
        if node.is_sink:
            continue
        try:
            values = node.state_tensors(session.states[n])
        except NotImplementedError as e:
            raise FdError(f"{plan.spec.file}: node {n!r} ({node.type_name}) cannot be snapshotted: {e}") from None
        meta = {}
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{n}/{k}"] = _host_copy(v)
            elif _is_json(v):
                meta[k] = v
            else:
                raise FdError(f"{plan.spec.file}: node {n!r} ({node.type_name}): state field {k!r} is a "
                              f"{type(v).__name__}, neither a tensor nor a JSON value")
        nodes[n] = meta
    inputs = {}
    for k, v in session.inputs.items():
        if isinstance(v, torch.Tensor):
            tensors[f"inputs/{k}"] = _host_copy(v)
        elif _is_json(v):
            inputs[k] = v
        else:
            raise FdError(f"{plan.spec.file}: input {k!r} is a {type(v).__name__}: a snapshot keeps tensors and "
                          "JSON values only")
    header = {"format": FORMAT, "spec": spec_identity(plan), "block": session.block, "inputs": inputs,
              "nodes": nodes, "torch": torch.__version__,
              "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                          for k, t in tensors.items()}}
    return Snapshot(header, tensors)


def write(snapshot: Snapshot, path: str | Path) -> Path:
    """One safetensors file with the header in its metadata, written atomically."""
    from safetensors.torch import save_file
    target = AtomicPath(path)
    try:
        save_file(snapshot.tensors, str(target.tmp), metadata={"fd": json.dumps(snapshot.header)})
    except BaseException:
        target.discard()
        raise
    return target.commit()


def read(path: str | Path) -> Snapshot:
    """A snapshot file; a clear error for a missing file or one that is not an fd session snapshot."""
    from safetensors import safe_open
    p = Path(path).expanduser()
    if not p.is_file():
        raise FdError(f"{p}: no such session snapshot")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a snapshot"
        raise FdError(f"{p}: not a session snapshot (safetensors could not read it: {e})") from None
    try:
        header = json.loads(meta["fd"])
    except (KeyError, ValueError):
        raise FdError(f"{p}: a safetensors file but not an fd session snapshot (no `fd` header)") from None
    if header.get("format") != FORMAT:
        raise FdError(f"{p}: snapshot format {header.get('format')!r}; this fd reads {FORMAT!r}")
    return Snapshot(header, tensors, str(p))


# ---------------------------------------------------------------------------------------------- checking
def differences(saved: dict, here: dict, limit: int = 6) -> list[str]:
    """What differs between two spec identities, as ``node.param: saved -> here`` lines."""
    out = []
    a, b = saved["nodes"], here["nodes"]
    for n in sorted(set(a) | set(b)):
        if n not in b:
            out.append(f"node {n!r} ({a[n]['type']}) is in the snapshot, not in this spec")
        elif n not in a:
            out.append(f"node {n!r} ({b[n]['type']}) is in this spec, not in the snapshot")
        elif a[n]["type"] != b[n]["type"]:
            out.append(f"node {n!r}: type {a[n]['type']} in the snapshot, {b[n]['type']} here")
        else:
            pa, pb = a[n]["params"], b[n]["params"]
            for k in sorted(set(pa) | set(pb)):
                if pa.get(k, "<default>") != pb.get(k, "<default>"):
                    out.append(f"nodes.{n}.params.{k}: {pa.get(k, '<default>')!r} in the snapshot, "
                               f"{pb.get(k, '<default>')!r} here")
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


def check_compatible(snapshot: Snapshot, plan) -> None:
    """Refuse a snapshot taken with another spec (nodes, types, params: hence shapes and dtypes)."""
    here = spec_identity(plan)
    saved = snapshot.header["spec"]
    if saved["fingerprint"] == here["fingerprint"]:
        return
    lines = differences(saved, here)
    which = (f"spec {saved['name']!r} with other node settings" if saved["name"] == here["name"]
             else f"another spec, {saved['name']!r} ({saved['file']}), not {here['name']!r}")
    raise FdError(f"{snapshot.source}: this session snapshot was taken with {which}; a snapshot restores only "
                  "into the spec it came from (run inputs such as the prompt may change):\n  " + "\n  ".join(lines))


# ---------------------------------------------------------------------------------------------- restoring
def restore(session, snapshot: Snapshot, inputs: dict[str, Any] | None = None) -> None:
    """Replace the session's state with the snapshot's; ``inputs`` override the saved run inputs."""
    plan = session.plan
    check_compatible(snapshot, plan)
    saved_inputs = dict(snapshot.header["inputs"])
    saved_inputs.update({k[len("inputs/"):]: t for k, t in snapshot.tensors.items() if k.startswith("inputs/")})
    for k in list(saved_inputs) + list(inputs or {}):
        session._check_input(k)
    session._init_state(keep_sinks=True)
    session.inputs.update(saved_inputs)
    session.inputs.update(inputs or {})
    for n in plan.order:
        node = session.nodes[n]
        if node.is_sink:
            continue
        values = snapshot.node_values(n)
        try:
            session.states[n] = node.load_state(session.states[n], values)
        except (ValueError, NotImplementedError) as e:
            raise FdError(f"{snapshot.source}: node {n!r} ({node.type_name}): {e}") from None
    session.block = int(snapshot.header["block"])
