"""A seeded mutator of the shipped specs: the mistakes a new user makes, as files ``fd validate`` must judge.

Each case is (description, argv for ``fd validate``) with the files it needs written under a directory. The
oracle (test_spec_fuzz.py) is the README's contract: exit 0 or 2, never 1; every error names a file and line.
Same seed, same cases: a failure is reproduced by its seed and index.
"""
from __future__ import annotations

import copy
import random
from pathlib import Path

import yaml

from engine.spec import packaged_spec_dir

WRONG_VALUES = ("abc", 3, -1, 0, 2.5, True, None, [1, 2], {"a": 1}, "", "${inputs.nope}", "${", "1e999",
                "${oc.env:FD_FUZZ_UNSET}", 10**12, "cuda:7", "../../etc/passwd", "hf://no/such:file.bin")


def shipped() -> list[Path]:
    return sorted(packaged_spec_dir().glob("*.yaml"))


def _paths(d, path=()):
    """Every key path in a nested mapping/list, parents before children."""
    out = []
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        out.append(path + (k,))
        out.extend(_paths(v, path + (k,)))
    return out


def _get(d, p):
    for k in p:
        d = d[k]
    return d


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 2:
        return word + "x"
    i = rng.randrange(len(word) - 1)
    return word[:i] + word[i + 1] + word[i] + word[i + 2:] if rng.random() < 0.5 else word[:i] + word[i + 1:]


def mutate(data: dict, rng: random.Random) -> tuple[str, dict]:
    """One mutation of a spec mapping (a deep copy): what was done, and the result."""
    d = copy.deepcopy(data)
    paths = [p for p in _paths(d) if p[0] != "extends"]
    p = rng.choice(paths)
    parent = _get(d, p[:-1])
    kind = rng.choice(("value", "value", "drop", "rename", "container", "top"))
    if kind == "value":
        parent[p[-1]] = copy.deepcopy(rng.choice(WRONG_VALUES))
        return f"{'.'.join(map(str, p))} = {parent[p[-1]]!r}", d
    if kind == "drop" and isinstance(parent, dict):
        del parent[p[-1]]
        return f"drop {'.'.join(map(str, p))}", d
    if kind == "rename" and isinstance(parent, dict) and isinstance(p[-1], str):
        parent[_typo(p[-1], rng)] = parent.pop(p[-1])
        return f"rename {'.'.join(map(str, p))}", d
    if kind == "container":
        v = parent[p[-1]]
        parent[p[-1]] = list(v.values()) if isinstance(v, dict) else {"k": v} if isinstance(v, list) else [v]
        return f"container swap at {'.'.join(map(str, p))}", d
    section = rng.choice(("inputs", "nodes", "sinks", "name"))
    d[section] = copy.deepcopy(rng.choice(WRONG_VALUES))
    return f"{section} = {d[section]!r}", d


def case(seed: int, index: int, workdir: Path) -> tuple[str, list[str]]:
    """Case ``index`` of a seeded run: a mutated copy, a child that ``extends:`` a shipped spec with a mutated
    part, a bad ``--set`` file, or a bad dotlist override. Writes its files into ``workdir``."""
    rng = random.Random(seed * 1_000_003 + index)
    src = rng.choice(shipped())
    data = yaml.safe_load(src.read_text())
    how = rng.choice(("copy", "copy", "child", "set", "dotlist", "extends"))
    out = workdir / f"case{index}.yaml"
    if how == "copy":
        what, mutated = mutate(data, rng)
        if rng.random() < 0.3:
            mutated.pop("extends", None)     # shipped specs extend by bare name, which resolves from anywhere
        out.write_text(yaml.safe_dump(mutated, sort_keys=False))
        return f"{src.stem}: {what}", ["validate", str(out)]
    if how == "child":
        what, mutated = mutate(data, rng)
        section = rng.choice([k for k in mutated if k != "extends"] or ["inputs"])
        out.write_text(yaml.safe_dump({"extends": src.stem, section: mutated.get(section)}, sort_keys=False))
        return f"child of {src.stem}: {what} (section {section})", ["validate", str(out)]
    if how == "set":
        what, mutated = mutate(data, rng)
        section = rng.choice([k for k in mutated if k != "extends"] or ["inputs"])
        out.write_text(yaml.safe_dump({section: mutated.get(section)}, sort_keys=False))
        return f"--set over {src.stem}: {what}", ["validate", src.stem, "--set", str(out)]
    if how == "dotlist":
        paths = [p for p in _paths(data) if p[0] not in ("extends",) and all(isinstance(k, str) for k in p)]
        p = rng.choice(paths)
        value = rng.choice(WRONG_VALUES)
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        key = ".".join(p) if rng.random() < 0.8 else _typo(".".join(p), rng)
        return f"{src.stem} {key}={text}", ["validate", src.stem, f"{key}={text}"]
    target = rng.choice(("/etc/passwd", "/etc", "nowhere.yaml", out.name, "[1, 2]", "{a: 1}", "", "/dev/null",
                         str(workdir / "binary.bin")))
    (workdir / "binary.bin").write_bytes(bytes(range(256)))
    body = yaml.safe_dump({k: v for k, v in data.items() if k != "extends"}, sort_keys=False)
    out.write_text(f"extends: {target}\n{body}")
    return f"{src.stem} with extends: {target}", ["validate", str(out)]
