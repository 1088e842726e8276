"""Drawing a plan: a rich tree for the terminal, and DOT / SVG / HTML files.

``model`` reads the plan (the only module that knows its shape), ``layout`` places boxes
and routes edges (grandalf ranks, our port routing), ``svg``/``dot``/``html``/``tree`` draw.
SVG uses Graphviz ``dot`` when it is installed and the pure-Python layout otherwise; the
HTML view embeds the pure-Python SVG (whose element ids its scripts rely on) and re-lays it
in the browser with the vendored elkjs (``assets/elk.bundled.js``, EPL-2.0, see
``assets/elkjs-LICENSE.md``).
``timings`` ({node: [ms, ...]}) overrides the per-node times recorded on the plan.
"""
from __future__ import annotations

import subprocess

from . import dot as _dot
from .html import to_html as _html
from .model import build
from .svg import render as _svg
from .tree import to_tree


def to_rich_tree(plan, timings=None):
    return to_tree(build(plan, timings))


def to_dot(plan, timings=None) -> str:
    return _dot.to_dot(build(plan, timings))


def to_svg(plan, timings=None, engine: str = "auto") -> str:
    """SVG of the plan; ``engine``: "auto" (Graphviz if installed), "dot" or "python"."""
    g = build(plan, timings)
    if engine == "dot" or (engine == "auto" and _dot.available()):
        try:
            return _dot.run_dot(_dot.to_dot(g), "svg")
        except (subprocess.SubprocessError, OSError):
            if engine == "dot":
                raise
    return _svg(g)


def dot_available() -> bool:
    return _dot.available()


def to_png(plan, timings=None) -> bytes:
    """PNG through Graphviz (needs ``dot``)."""
    return subprocess.run(["dot", "-Tpng"], input=_dot.to_dot(build(plan, timings)).encode(), capture_output=True,
                          check=True, timeout=60).stdout


def to_html(plan, timings=None) -> str:
    return _html(build(plan, timings))


__all__ = ["build", "dot_available", "to_dot", "to_html", "to_png", "to_rich_tree", "to_svg"]
