"""Ring attention: attention over keys/values that are split across ranks, merged exactly.

Layout everywhere: q, k, v, out are ``[B, L, H, D]`` (the Wan DiT layout; torch SDPA wants
``[B, H, L, D]``, the transposes happen here). ``lse`` is the natural-log log-sum-exp of the
scaled scores over the keys a partial saw, ``[B, Lq, H]`` in float32.

Attention over a union of key sets is a weighted sum of the attentions over each set:
``out = sum_i exp(lse_i - lse) * out_i`` with ``lse = logsumexp_i lse_i``. That identity is what
makes every variant here exact up to float rounding, and it is why a partial must return its lse.

Two ways to use it:

* ``ring_attention_gather`` - the causal-block / KV-cache case. The query block (the frames being
  denoised) is short and REPLICATED on every rank of the group; the long KV cache is SHARDED (by
  frames) so each rank holds only its part. Each rank attends the full query to its shard, then
  one all-gather of (out, lse) and a merge gives every rank the same full output. Replicated
  queries keep everything around attention (projections, FFN, the next block) unchanged and
  unsharded; the saving is KV-cache memory and attention FLOPs over the cache. In a causal block
  DiT the current block sees the whole cache plus itself, so no mask is needed.
* ``ring_attention`` - bidirectional sequence parallelism (q, k, v all sharded along L): K/V shards
  travel around the ring with isend/irecv while each rank attends to the shard it holds.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.parallel import ParallelGroup

from .attention import attention, finite_or_zero


def merge_partials(outs: torch.Tensor | list[torch.Tensor], lses: torch.Tensor | list[torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the union of the partials' key sets.

    ``outs`` [N, B, Lq, H, D] (or a list of N), ``lses`` [N, B, Lq, H]. Computed in float32; returns
    ``(out float32 [B, Lq, H, D], lse float32 [B, Lq, H])``. Rows where every partial is empty give
    out = 0, lse = -inf (never NaN).
    """
    outs = torch.stack(list(outs)) if isinstance(outs, (list, tuple)) else outs
    lses = torch.stack(list(lses)) if isinstance(lses, (list, tuple)) else lses
    lses = lses.float()
    lse = torch.logsumexp(lses, dim=0)
    w = torch.exp(lses - finite_or_zero(lse))                         # [N, B, Lq, H]
    return (w.unsqueeze(-1) * outs.float()).sum(0), lse


def merge_two(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Running form of ``merge_partials`` for the ring: fold partial b into accumulator a (float32)."""
    lse = torch.logaddexp(lse_a, lse_b)
    ref = finite_or_zero(lse)
    out = torch.exp(lse_a - ref).unsqueeze(-1) * out_a.float() + torch.exp(lse_b - ref).unsqueeze(-1) * out_b.float()
    return out, lse


def ring_attention_gather(q: torch.Tensor, k_shard: torch.Tensor, v_shard: torch.Tensor, group: ParallelGroup,
                          scale: float | None = None) -> torch.Tensor:
    """Replicated query, sharded KV cache: every rank returns the full attention output [B, Lq, H, D].

    ``q`` must be identical on all ranks of the group; ``k_shard``/``v_shard`` [B, Lk_r, H, D] are this
    rank's keys/values (any Lk_r per rank, 0 allowed). Which frames a rank holds does not matter
    (attention is permutation invariant over keys) as long as every key lives on exactly one rank.
    One all-gather of (out, lse) packed in float32, then an exact merge.
    """
    if not group.active:
        if k_shard.shape[1] == 0:
            return attention(q, k_shard, v_shard, scale=scale, return_lse=True)[0]
        return attention(q, k_shard, v_shard, scale=scale)
    out, lse = attention(q, k_shard, v_shard, scale=scale, return_lse=True)
    packed = torch.cat([out.float(), lse.unsqueeze(-1)], dim=-1).contiguous()      # [B, Lq, H, D + 1]
    gathered = [torch.empty_like(packed) for _ in range(group.size)]
    dist.all_gather(gathered, packed, group=group.group)
    allp = torch.stack(gathered)
    merged, _ = merge_partials(allp[..., :-1], allp[..., -1])
    return merged.to(q.dtype)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: ParallelGroup,
                   scale: float | None = None) -> torch.Tensor:
    """Bidirectional sequence-parallel attention: q, k, v are this rank's sequence shard [B, L/N, H, D];
    returns this rank's shard of the output (the same rows as its q).

    K and V (stacked, one message) move one step around the ring per iteration with batched
    isend/irecv; the next shard is in flight while the current one is attended (on NCCL the P2P runs
    on its own stream, on gloo in a background thread). All ranks' k/v shards must have the same shape
    (the receive buffer is sized from the local one): pad the sequence to a multiple of N.
    """
    if not group.active:
        return attention(q, k, v, scale=scale)
    kv = torch.stack([k, v]).contiguous()
    send_to, recv_from = group.global_rank(group.rank + 1), group.global_rank(group.rank - 1)
    out = lse = None
    for step in range(group.size):
        reqs = []
        if step < group.size - 1:
            nxt = torch.empty_like(kv)
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, send_to, group.group),
                                           dist.P2POp(dist.irecv, nxt, recv_from, group.group)])
        o, l = attention(q, kv[0], kv[1], scale=scale, return_lse=True)
        out, lse = (o.float(), l) if out is None else merge_two(out, lse, o, l)
        for r in reqs:
            r.wait()
        if reqs:
            kv = nxt
    return out.to(q.dtype)
