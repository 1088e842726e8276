"""Cosmos-Predict2 / 2.5 (2B): the MiniTrainDIT network, its rectified-flow AB2 sampler, Video2World sampling.

Kept import-free so ``import nodes.cosmos`` stays cheap; import the submodules directly.
"""
