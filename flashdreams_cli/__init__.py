"""The `fd` command line."""
