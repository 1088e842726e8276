"""Wan 2.1 diffusion transformer: bidirectional (T2V/I2V) and causal KV-cached modes.

Kept import-free so ``import nodes.wan`` stays cheap; import the submodules
(``nodes.wan.dit``, ``nodes.wan.causal``, ...) directly.
"""
