"""Packaged specs: `fd exec <name>` finds specs/<name>.yaml here after install."""
