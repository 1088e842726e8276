"""Process groups for context parallelism, and launching ranks.

The engine creates the groups a plan asks for and hands each node its own; how a model splits
its attention over a group (ring, Ulysses, token sharding) lives with the shared model parts in
``nodes/common``. Strategy names are defined once, here.
"""
from .groups import (SINGLE, STRATEGIES, ParallelGroup, WorldInfo, check_context_size, init_distributed,
                     make_context_groups)
from .launch import LaunchError, free_port, spawn_ranks

__all__ = ["SINGLE", "STRATEGIES", "ParallelGroup", "WorldInfo", "check_context_size", "init_distributed",
           "make_context_groups", "LaunchError", "free_port", "spawn_ranks"]
