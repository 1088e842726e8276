"""Reading checkpoints lazily and loading them into modules built on the meta device.

A model node builds its module under ``torch.device("meta")`` (no memory),
then ``load_into`` reads the checkpoint one tensor at a time, casts it and puts
it straight on the node's device, and assigns it (``load_state_dict(assign=True)``).
Peak host memory is one tensor, whatever the model size.

Module protocol: buffers that are not saved in checkpoints (``persistent=False``,
e.g. RoPE tables) stay on meta after loading. Any submodule that owns such
buffers defines ``init_non_persistent(self, device: torch.device) -> None``,
which recomputes them on ``device``; ``load_into`` and ``random_init`` call it on
every submodule that has it, after the weights are in place, and then fail if
any tensor is still on meta.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import CheckpointError
from .keymaps import KeyMap, apply

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"
SHOWN_KEYS = 10  # how many keys of each kind an error lists

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class _Entry:
    """Where one tensor lives: a safetensors file (read on demand) or an already mapped torch tensor."""
    __slots__ = ("handle", "name", "tensor", "file")

    def __init__(self, file: Path, handle: Any = None, name: str = "", tensor: torch.Tensor | None = None):
        self.file, self.handle, self.name, self.tensor = file, handle, name, tensor

    def read(self) -> torch.Tensor:
        return self.tensor if self.tensor is not None else self.handle.get_tensor(self.name)

    def shape(self) -> tuple[int, ...]:
        if self.tensor is not None:
            return tuple(self.tensor.shape)
        return tuple(self.handle.get_slice(self.name).get_shape())

    def dtype(self) -> torch.dtype:
        if self.tensor is not None:
            return self.tensor.dtype
        return _ST_DTYPES[self.handle.get_slice(self.name).get_dtype()]


class Checkpoint(Mapping):
    """The tensors of one checkpoint (one file or several shards), read only when asked for.

    Indexing gives a CPU tensor in the stored dtype; ``tensor(key, device, dtype)``
    gives it converted; ``shape``/``dtype`` answer from the headers without reading.
    """

    def __init__(self, entries: dict[str, _Entry], files: list[Path]):
        self._entries, self.files = entries, files

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._entries[key].read()

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape()

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key].dtype()

    def tensor(self, key: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        return _convert(self[key], device, dtype)

    def renamed(self, new_to_old: Mapping[str, str]) -> "Checkpoint":
        return Checkpoint({new: self._entries[old] for new, old in new_to_old.items()}, self.files)

    def __repr__(self) -> str:
        return f"Checkpoint({len(self)} tensors from {', '.join(str(f) for f in self.files)})"


def _convert(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None) -> torch.Tensor:
    """Move and cast one tensor; only floating tensors are cast, narrowing casts happen before the copy."""
    if dtype is None or not t.is_floating_point() or t.dtype == dtype:
        return t.to(device)
    if torch.empty((), dtype=dtype).element_size() < t.element_size():
        return t.to(dtype).to(device)
    return t.to(device).to(dtype)


# ---------------------------------------------------------------- opening files

def open_checkpoint(source: str | os.PathLike | Iterable[str | os.PathLike], *,
                    select: str | None = None, strip_prefix: str | None = None) -> Checkpoint:
    """Open a checkpoint without reading its tensors.

    ``source``: a ``.safetensors`` file, a ``*.safetensors.index.json`` (sharded),
    a folder (its index, else its ``*.safetensors`` shards, else its one torch file),
    a ``.pth/.pt/.bin/.ckpt`` file, a list of any of these, or an ``hf://`` reference
    (for a sharded DiT in a repo that also holds the VAE and T5, name its
    ``...safetensors.index.json``: only the shards it lists are downloaded).
    ``select``: for torch files holding a dict of state dicts (Self-Forcing's
    ``{'generator': ..., 'generator_ema': ...}``), the entry to use; '/' separates levels.
    ``strip_prefix``: removed from every key that starts with it (e.g. ``"model."``).
    """
    files = _expand(source)
    if select is not None and all(f.suffix == ".safetensors" for f in files):
        raise CheckpointError(f"select={select!r} applies to torch files; {files[0]} is safetensors")
    entries: dict[str, _Entry] = {}
    for f in files:
        found = _open_safetensors(f) if f.suffix == ".safetensors" else _open_torch(f, select)
        for k, e in found.items():
            if k in entries:
                raise CheckpointError(f"key {k!r} is in both {entries[k].file} and {f}")
            entries[k] = e
    if strip_prefix:
        if not any(k.startswith(strip_prefix) for k in entries):
            raise CheckpointError(f"strip_prefix={strip_prefix!r}: no key of {files[0]} starts with it "
                                  f"(first keys: {', '.join(list(entries)[:5])})")
        entries = {(k[len(strip_prefix):] if k.startswith(strip_prefix) else k): e for k, e in entries.items()}
    return Checkpoint(entries, files)


def read_state_dict(source: str | os.PathLike | Iterable[str | os.PathLike], *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, select: str | None = None,
                    strip_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The whole checkpoint as a dict on ``device`` (floating tensors cast to ``dtype`` when given)."""
    ckpt = open_checkpoint(source, select=select, strip_prefix=strip_prefix)
    return {k: ckpt.tensor(k, device, dtype) for k in ckpt}


def _expand(source) -> list[Path]:
    """The checkpoint files ``source`` names, in load order."""
    from .resolve import parse_hf_ref, resolve
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.startswith("hf://"):
            ref = parse_hf_ref(text)
            is_file = ref.path.endswith((".safetensors", SAFETENSORS_INDEX_SUFFIX) + TORCH_SUFFIXES)
            path = resolve(text, kind="file" if is_file else "folder")
            if path.name.endswith(SAFETENSORS_INDEX_SUFFIX):
                _fetch_shards(ref, path)
        else:
            path = resolve(text, kind="folder" if Path(text).expanduser().is_dir() else "file")
        return _files_of(path)
    out: list[Path] = []
    for s in source:
        out.extend(_expand(s))
    if not out:
        raise CheckpointError("empty list of checkpoint files")
    return out


def _fetch_shards(ref, index: Path) -> None:
    """Resolve every shard an hf:// index names (they sit next to it in the same snapshot)."""
    from .resolve import HfRef, resolve
    folder = ref.path.rsplit("/", 1)[0] + "/" if "/" in ref.path else ""
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        resolve(str(HfRef(ref.repo_id, folder + shard, ref.revision, ref.repo_type)), kind="file")


def _files_of(path: Path) -> list[Path]:
    if path.name.endswith(SAFETENSORS_INDEX_SUFFIX):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{path}: not a safetensors index (needs a 'weight_map'): {e}") from e
        shards = [path.parent / s for s in dict.fromkeys(weight_map.values())]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{path}: shards missing: {', '.join(missing[:SHOWN_KEYS])}")
        return shards
    if path.is_file():
        if path.suffix == ".safetensors" or path.suffix in TORCH_SUFFIXES:
            return [path]
        raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors, "
                              f"{SAFETENSORS_INDEX_SUFFIX}, or {'/'.join(TORCH_SUFFIXES)})")
    indexes = sorted(path.glob(f"*{SAFETENSORS_INDEX_SUFFIX}"))
    if len(indexes) == 1:
        return _files_of(indexes[0])
    if len(indexes) > 1:
        raise CheckpointError(f"{path}: several shard indexes ({', '.join(p.name for p in indexes)}); "
                              "name the one to use")
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    torch_files = sorted(p for p in path.iterdir() if p.suffix in TORCH_SUFFIXES)
    if len(torch_files) == 1:
        return torch_files
    raise CheckpointError(f"{path}: no checkpoint found (no *.safetensors, and "
                          f"{len(torch_files)} torch files: {', '.join(p.name for p in torch_files) or 'none'})")


def _open_safetensors(path: Path) -> dict[str, _Entry]:
    from safetensors import safe_open
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated headers
        raise CheckpointError(f"{path}: cannot read as safetensors: {e}") from e
    return {k: _Entry(path, handle, k) for k in handle.keys()}


def _open_torch(path: Path, select: str | None) -> dict[str, _Entry]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as e:  # pickle refusals under weights_only, truncated files
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint (weights_only=True): {e}") from e
    for part in (select.split("/") if select else []):
        if not isinstance(obj, Mapping) or part not in obj:
            have = list(obj.keys()) if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(f"{path}: select={select!r}: no entry {part!r} (has: {have})")
        obj = obj[part]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
    if nested:
        raise CheckpointError(f"{path}: holds several state dicts ({', '.join(map(str, nested))}); "
                              f"pick one with select=, e.g. select={nested[-1]!r}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:SHOWN_KEYS]))}")
    return {k: _Entry(path, tensor=v) for k, v in obj.items()}


# ---------------------------------------------------------------- loading into modules

def load_into(model: nn.Module | Callable[[], nn.Module], state_dict: Mapping[str, torch.Tensor], *,
              keymap: KeyMap | None = None, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None, strict: bool = True,
              progress: Callable[[int, int], None] | None = None) -> nn.Module:
    """Load ``state_dict`` (a dict or a lazy ``Checkpoint``) into ``model`` and return it.

    ``model`` is a module (ideally built under ``torch.device("meta")``) or a
    factory called under the meta device. Keys are renamed with ``keymap`` first.
    Each tensor is converted to ``device`` and ``dtype`` (floating tensors only;
    None keeps the dtype the module declares) right before it is assigned.
    Names and shapes are checked against the module before any tensor is read.
    ``strict=False`` ignores unexpected keys; missing ones are still an error
    when they would stay on the meta device. ``progress(done, total)`` is called
    after each tensor is read (a progress bar for large checkpoints).
    """
    if not isinstance(model, nn.Module):
        with torch.device("meta"):
            model = model()
    device = torch.device(device)
    sd = apply(keymap, state_dict)
    target = model.state_dict(keep_vars=True)
    _check_fit(model, sd, target, strict, keymap)
    loaded: dict[str, torch.Tensor] = {}
    tied: dict[int, torch.Tensor] = {}  # a parameter shared by two names (tied embeddings) is read once
    todo = [k for k in target if k in sd]
    with torch.no_grad():
        for i, k in enumerate(todo):
            if id(target[k]) in tied:
                loaded[k] = tied[id(target[k])]
            else:
                want = dtype if dtype is not None else target[k].dtype
                loaded[k] = sd.tensor(k, device, want) if isinstance(sd, Checkpoint) else _convert(sd[k], device, want)
                tied[id(target[k])] = loaded[k]
            if progress is not None:
                progress(i + 1, len(todo))
    model.load_state_dict(loaded, strict=False, assign=True)
    _finish(model, device)
    return model


def _shape_of(sd: Mapping, key: str) -> tuple[int, ...]:
    return sd.shape(key) if isinstance(sd, Checkpoint) else tuple(sd[key].shape)


def _check_fit(model: nn.Module, sd: Mapping, target: dict[str, torch.Tensor], strict: bool,
               keymap: KeyMap | None) -> None:
    have, want = set(sd.keys()), set(target)
    missing = sorted(k for k in want - have if strict or target[k].is_meta)
    unexpected = sorted(have - want) if strict else []
    mismatched = [(k, _shape_of(sd, k), tuple(target[k].shape)) for k in sorted(have & want)
                  if _shape_of(sd, k) != tuple(target[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    name = type(model).__name__
    counts = [f"{len(missing)} missing", f"{len(unexpected)} unexpected", f"{len(mismatched)} shape-mismatched"]
    lines = [f"checkpoint does not fit {name}{f' (after keymap {keymap.name!r})' if keymap else ''}: "
             + ", ".join(counts) + " keys"]
    for label, keys in (("missing (in the module, not in the checkpoint)", missing),
                        ("unexpected (in the checkpoint, not in the module)", unexpected)):
        if keys:
            lines.append(f"  {label}: " + _listing(keys))
    if mismatched:
        lines.append("  shape mismatch (checkpoint vs module): " + _listing(
            [f"{k} {list(a)} vs {list(b)}" for k, a, b in mismatched]))
    hint = _layout_hint(have, want, keymap)
    if hint:
        lines.append(f"  hint: {hint}")
    raise CheckpointError("\n".join(lines))


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:SHOWN_KEYS])
    return shown + (f", ... and {len(items) - SHOWN_KEYS} more" if len(items) > SHOWN_KEYS else "")


def _layout_hint(have: set[str], want: set[str], keymap: KeyMap | None) -> str | None:
    """Say which known transformation would make the checkpoint keys fit better."""
    base = len(have & want)
    best: tuple[int, str] | None = None
    prefix = _common_extra_prefix(have - want, want - have)
    if prefix is not None:
        kind, p = prefix
        text = (f"the checkpoint keys carry an extra prefix {p!r}; pass strip_prefix={p!r}" if kind == "strip"
                else f"the module keys carry a prefix {p!r} that the checkpoint lacks")
        best = (len(want), text)
    from . import wan_layouts
    symbols = {id(v): n for n, v in vars(wan_layouts).items() if isinstance(v, KeyMap)}
    for km in wan_layouts.KNOWN_KEYMAPS:
        if keymap is not None and km.name == keymap.name:
            continue
        try:
            fit = len(set(km.rename_keys(have)) & want)
        except CheckpointError:
            continue
        if fit > base and (best is None or fit > best[0]):
            best = (fit, f"the checkpoint looks like another layout: keymap {km.name!r} "
                         f"(nodes.checkpoint.wan_layouts.{symbols.get(id(km), '?')}) makes "
                         f"{fit}/{len(want)} module keys fit (now {base})")
    return best[1] if best else None


def _common_extra_prefix(extra: set[str], lacking: set[str]) -> tuple[str, str] | None:
    """('strip', p) if the unexpected keys are missing keys with ``p`` in front; ('add', p) the other way."""
    for kind, longer, shorter in (("strip", extra, lacking), ("add", lacking, extra)):
        if not longer or not shorter:
            continue
        sample = min(longer)
        for s in shorter:
            p = sample[: len(sample) - len(s)]
            if sample.endswith(s) and p.endswith(".") and (
                    sum(k.startswith(p) and k[len(p):] in shorter for k in longer) >= 0.5 * len(longer)):
                return kind, p
    return None


def _finish(model: nn.Module, device: torch.device) -> None:
    """Recompute non-persistent buffers, then make sure nothing is left on meta."""
    for m in model.modules():
        hook = getattr(m, "init_non_persistent", None)
        if callable(hook):
            hook(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(
            f"{type(model).__name__}: still on the meta device after loading: {_listing(left)} "
            "(missing from the checkpoint, or a non-persistent buffer whose module lacks "
            "init_non_persistent(device))")


# ---------------------------------------------------------------- random weights

def random_init(model: nn.Module, seed: int, *, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None) -> nn.Module:
    """Fill every parameter with deterministic random values (``weights: random`` benchmarks and demos).

    Scales keep activations O(1) like a trained net: Linear/Conv/Embedding
    weights N/sqrt(fan_in), biases 0.05 N, norm scales 1 + 0.1 N, other raw
    parameters (e.g. Wan's modulation tables) N/sqrt(last dim). Each parameter
    draws from its own generator seeded by (seed, name), on the parameter's
    device, so values do not depend on module order and a 14B model fills in
    seconds on a GPU. A meta-device module is first materialized on ``device``
    (its persistent buffers zeroed); ``dtype`` casts the floating parameters.
    """
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model.to_empty(device=torch.device(device or "cpu"))
        with torch.no_grad():
            for b in model.buffers():
                b.zero_()
    elif device is not None:
        model.to(device)
    if dtype is not None:
        model.to(dtype)
    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                g = torch.Generator(device=p.device).manual_seed(
                    (seed * 1_000_003 + zlib.crc32(full.encode())) % 2**63)
                n = torch.randn(p.shape, generator=g, device=p.device, dtype=_draw_dtype(p.dtype))
                mean, std = _init_stats(mod, p_name, p)
                p.copy_(n.mul_(std).add_(mean))
    _finish(model, next((t.device for t in model.parameters()), torch.device(device or "cpu")))
    return model


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype.is_floating_point and dtype.itemsize >= 2 else torch.float32


_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
             nn.ConvTranspose3d, nn.Embedding)


def _init_stats(mod: nn.Module, name: str, p: torch.Tensor) -> tuple[float, float]:
    """(mean, std) for one parameter, chosen by the kind of module that owns it."""
    if name == "bias" or name.endswith("_bias"):
        return 0.0, 0.05
    if isinstance(mod, _WEIGHTED) and name == "weight":
        if isinstance(mod, nn.Embedding):
            return 0.0, 1.0
        fan_in = p.shape[1] * math.prod(p.shape[2:]) if p.dim() > 1 else p.shape[0]
        if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            fan_in = p.shape[0] * math.prod(p.shape[2:])
        return 0.0, 1.0 / math.sqrt(max(fan_in, 1))
    if p.dim() <= 1 or name in ("weight", "gamma", "scale") or "norm" in type(mod).__name__.lower():
        return 1.0, 0.1  # norm scales
    return 0.0, 1.0 / math.sqrt(max(p.shape[-1], 1))
