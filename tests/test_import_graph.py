"""The layering holds: engine knows no node package or front end, families stay apart, and no two
modules import each other (directly or round a longer circle). Read from the source with ast, every
import counted, including those inside functions."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "nodes", "flashdreams_cli", "specs")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, mod: str) -> set[str]:
    out = set()
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}
    return out


def import_graph() -> nx.DiGraph:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    g = nx.DiGraph()
    g.add_nodes_from(files)
    for mod, path in files.items():
        for target in imports_of(path, mod):
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != mod and not mod.startswith(target + "."):
                g.add_edge(mod, target)   # a parent package's __init__ is imported anyway: not a circle
    return g


GRAPH = import_graph()


def edges(src: str, dst: str) -> list[tuple[str, str]]:
    return [(a, b) for a, b in GRAPH.edges if (a == src or a.startswith(src + ".")) and
            (b == dst or b.startswith(dst + "."))]


def test_engine_imports_no_nodes_and_no_cli():
    assert edges("engine", "nodes") == [] and edges("engine", "flashdreams_cli") == []


def test_nodes_import_no_cli():
    assert edges("nodes", "flashdreams_cli") == []


def test_sampler_and_shared_parts_import_no_family():
    assert edges("nodes.ar", "nodes.wan") == [] and edges("nodes.ar", "nodes.cosmos") == []
    assert edges("nodes.ar", "nodes.omnidreams") == []
    for family in ("nodes.wan", "nodes.taehv", "nodes.text", "nodes.image", "nodes.cosmos", "nodes.omnidreams"):
        assert edges("nodes.common", family) == []


def test_families_stay_apart():
    """A family is one package: Cosmos shares nothing with Wan but what lives in nodes.common."""
    assert edges("nodes.cosmos", "nodes.wan") == [] and edges("nodes.wan", "nodes.cosmos") == []
    # OmniDreams builds on Cosmos (and nodes.common) only; Cosmos does not know it
    assert edges("nodes.omnidreams", "nodes.wan") == [] and edges("nodes.cosmos", "nodes.omnidreams") == []
    assert edges("nodes.omnidreams", "nodes.cosmos") != []


def test_no_import_circle():
    cycles = [c for c in nx.simple_cycles(GRAPH) if len(c) > 1]
    assert cycles == []


def test_the_checker_sees_a_planted_circle(tmp_path):
    """The graph builder is not blind: relative and function-level imports are edges."""
    a = ROOT / "engine" / "node.py"
    found = imports_of(a, "engine.node")
    assert "engine.types" in found
    g = import_graph()
    assert g.has_edge("nodes.ar.node", "nodes.common.causal") and g.has_edge("flashdreams_cli.main",
                                                                               "flashdreams_cli.run")
