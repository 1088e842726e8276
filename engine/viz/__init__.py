"""Drawing a plan: a rich tree for the terminal, and DOT / SVG / HTML files.

``model`` reads the plan (in one place), ``layout`` places boxes and routes edges,
``svg``/``dot``/``html``/``tree`` draw. See each module for why it is built the way it is.
"""
from __future__ import annotations

from ._old import node_facts, to_dot, to_html, to_rich_tree, to_svg  # noqa: F401  (replaced below)
