"""Context parallelism: split one node's attention over a group of ranks, exactly.

Tensor layout of every attention primitive: ``[B, L, H, D]`` (batch, sequence, heads, head dim).
A ``ParallelGroup`` of size 1 makes every primitive plain single-device attention.
"""
from .groups import (SINGLE, STRATEGIES, ParallelGroup, WorldInfo, check_context_size, init_distributed,
                     make_context_groups)
from .launch import LaunchError, free_port, spawn_ranks
from .ring import attention, merge_partials, merge_two, partial_attention, ring_attention, ring_attention_gather
from .ulysses import heads_to_seq, seq_to_heads, ulysses_attention

__all__ = ["SINGLE", "STRATEGIES", "ParallelGroup", "WorldInfo", "check_context_size", "init_distributed",
           "make_context_groups", "LaunchError", "free_port", "spawn_ranks", "attention", "merge_partials",
           "merge_two", "partial_attention", "ring_attention", "ring_attention_gather", "heads_to_seq",
           "seq_to_heads", "ulysses_attention"]
