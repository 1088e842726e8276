"""Generic nodes that need no weights."""
