"""Ulysses (DeepSpeed) sequence parallelism: trade the sequence split for a head split.

Every rank holds a sequence shard of q, k, v ``[B, L/N, H, D]``. One all-to-all turns that into
the full sequence for H/N of the heads ``[B, L, H/N, D]``; heads are independent, so each rank runs
ordinary attention on its heads, and a second all-to-all turns the output back into a sequence
shard. Exact (no merge at all), two all-to-alls per attention, needs H divisible by N.

With a KV cache, cache the head-sharded k/v (the output of ``seq_to_heads``): each rank keeps the
whole history for its own heads, and the cache needs no communication at all.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.parallel import ParallelGroup

from .attention import attention


def check_heads(heads: int, group: ParallelGroup) -> None:
    if heads % group.size:
        raise ValueError(f"Ulysses context parallelism splits attention heads: {heads} heads are not divisible "
                         f"by the context size {group.size} (use a context size dividing {heads}, or strategy 'ring')")


def seq_to_heads(x: torch.Tensor, group: ParallelGroup) -> torch.Tensor:
    """[B, L/N, H, D] sequence shard -> [B, L, H/N, D] full sequence for this rank's heads.

    Rank r gets heads [r*H/N, (r+1)*H/N); the sequence is the shards concatenated in group-rank order.
    """
    if not group.active:
        return x
    B, Ls, H, D = x.shape
    check_heads(H, group)
    n = group.size
    send = x.reshape(B, Ls, n, H // n, D).permute(2, 0, 1, 3, 4).contiguous()      # [N, B, Ls, H/N, D]; row j -> rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group.group)                          # row i <- rank i's shard
    return recv.permute(1, 0, 2, 3, 4).reshape(B, n * Ls, H // n, D)


def heads_to_seq(x: torch.Tensor, group: ParallelGroup) -> torch.Tensor:
    """Inverse of ``seq_to_heads``: [B, L, H/N, D] -> [B, L/N, H, D]. L must be divisible by N."""
    if not group.active:
        return x
    B, L, Hn, D = x.shape
    n = group.size
    if L % n:
        raise ValueError(f"sequence length {L} is not divisible by the context size {n}")
    send = x.reshape(B, n, L // n, Hn, D).permute(1, 0, 2, 3, 4).contiguous()     # row i: sequence shard i -> rank i
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group.group)                          # row j <- head chunk j
    return recv.permute(1, 2, 0, 3, 4).reshape(B, L // n, n * Hn, D)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: ParallelGroup,
                      scale: float | None = None) -> torch.Tensor:
    """Sequence-sharded q, k, v [B, L/N, H, D] -> this rank's sequence shard of the output [B, L/N, H, D].

    All ranks must hold equally long shards (pad the sequence to a multiple of N); k/v may be longer
    or shorter than q (their shards are equal among themselves).
    """
    if not group.active:
        return attention(q, k, v, scale=scale)
    check_heads(q.shape[2], group)
    if q.shape == k.shape == v.shape:                   # one all-to-all for all three, stacked on batch
        qh, kh, vh = seq_to_heads(torch.cat([q, k, v]), group).chunk(3)
    else:
        qh, kh, vh = (seq_to_heads(t, group) for t in (q, k, v))
    return heads_to_seq(attention(qh, kh, vh, scale=scale), group)
