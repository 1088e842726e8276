"""Context parallelism for a causal DiT: every rank of a group runs the model on 1/N of each frame's tokens.

Why split inside frames: the causal DiT denoises a short block of frames against a long KV cache,
so splitting by frames would leave ranks idle. Rank r keeps tokens [r*s, (r+1)*s) of every frame
(s = h*w / N, patch-grid tokens), so every rank has the same number of tokens in every block, every
cache prefix has the same length on every rank, and the per-frame AdaLN / head modulation still
sees whole frames of its own tokens. Patch embedding runs on the full latent (it is cheap) and
the full-block RoPE table is indexed to the rank's tokens, so positions stay global. Everything
per-token (projections, FFN, cross-attention, head) runs on local tokens only; self-attention
is the one place ranks talk:

* ``ring``: the rank's cache holds its own tokens of every cached frame (a SelfKVCache with
  ``frame_tokens = s``, same [sink | window] plan as one device). Local q attends to all ranks'
  cache prefixes with the true ring: K/V shards travel around, partials merge by log-sum-exp in
  float32. Cache memory and attention FLOPs are split N ways; any head count works.
* ``ulysses``: two all-to-alls trade the token split for a head split; the rank's cache holds
  H/N heads of every token (``num_heads = H/N``, ``frame_tokens = h*w``); attention is local,
  exact, no merge. Needs H divisible by N.

The head output (``prod(patch) * out_dim`` channels, far narrower than ``dim``) is all-gathered
and put back in frame order before unpatchify, so every rank returns the full prediction and an
AR rollout advances identically everywhere. A group of size 1 (or none) never gets here:
``for_group`` returns None and the DiT takes its plain path.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.parallel import ParallelGroup

from .attention import attention
from .kv_cache import BlockPlan, DeviceRows, SelfKVCache
from .ring import ring_attention
from .ulysses import check_heads, heads_to_seq, seq_to_heads


def for_group(group: ParallelGroup | None) -> "TokenSharding | None":
    """The DiT's hook: None (plain path, no collective, no copy) unless the group has > 1 rank."""
    return TokenSharding(group) if group is not None and group.active else None


def tokens_per_rank(frame_tokens: int, group: ParallelGroup) -> int:
    """s = tokens of each frame a rank keeps; a clear error when the frame does not split evenly."""
    if frame_tokens % group.size:
        raise ValueError(f"context parallelism splits each frame's {frame_tokens} patch tokens over "
                         f"{group.size} ranks: not divisible (choose a context size dividing {frame_tokens}, "
                         f"or a latent size whose patch grid h*w is a multiple of {group.size})")
    return frame_tokens // group.size


def make_rank_cache(layout, group: ParallelGroup | None, frame_tokens: int, **cache_kwargs) -> SelfKVCache:
    """This rank's share of the rollout's self-attention cache.

    ``layout`` is any model config with ``num_layers``, ``num_heads`` and ``head_dim``.
    ``frame_tokens`` is the full frame (h*w patch tokens); ``cache_kwargs`` are SelfKVCache's
    (sink_frames, window_frames, max_frames, batch_size, rope_mode, dtype, device). Ring: all heads
    of s = h*w/N tokens per frame; Ulysses: H/N heads of all h*w tokens. Either way 1/N of the memory.
    """
    heads = layout.num_heads
    if group is not None and group.active:
        tokens = tokens_per_rank(frame_tokens, group)
        if group.strategy == "ulysses":
            check_heads(heads, group)
            heads //= group.size
        else:
            frame_tokens = tokens
    return SelfKVCache(layout.num_layers, heads, layout.head_dim, frame_tokens, **cache_kwargs)


class TokenSharding:
    """One active group's view of the DiT: which tokens are local, and how self-attention crosses ranks."""

    def __init__(self, group: ParallelGroup):
        self.group = group  # its strategy was checked where the group was made (engine.parallel.groups)

    def _local(self, x: torch.Tensor, frames: int, dim: int) -> torch.Tensor:
        """x with f*h*w tokens (frame-major) on ``dim`` -> this rank's s tokens of every frame."""
        n, r = self.group.size, self.group.rank
        return x.unflatten(dim, (frames, n, -1)).select(dim + 1, r).flatten(dim, dim + 1)

    def shard(self, tokens: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], frames: int
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """tokens [B, f*h*w, C] -> [B, f*s, C]; rope cos/sin [f*h*w, 1, D/2] -> the same rows (global positions)."""
        tokens_per_rank(tokens.shape[1] // frames, self.group)
        return self._local(tokens, frames, 1), (self._local(rope[0], frames, 0), self._local(rope[1], frames, 0))

    def cache_frame_tokens(self, frame_tokens: int) -> int:
        """Tokens per frame in this rank's cache (what make_rank_cache built it for)."""
        return tokens_per_rank(frame_tokens, self.group) if self.group.strategy == "ring" else frame_tokens

    def gather(self, out: torch.Tensor, frames: int) -> torch.Tensor:
        """[B, f*s, P] local head output -> [B, f*h*w, P], identical on every rank, frame order restored."""
        g = self.group
        parts = [torch.empty_like(out) for _ in range(g.size)]
        dist.all_gather(parts, out.contiguous(), group=g.group)
        full = torch.stack(parts, dim=1)                                  # [B, N, f*s, P]
        return full.unflatten(2, (frames, -1)).transpose(1, 2).flatten(1, 3)

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                       cache: SelfKVCache | None, plan: BlockPlan | None, rows: DeviceRows | None,
                       backend: str) -> torch.Tensor:
        """Local post-RoPE q, k, v [B, f*s, H, D] -> local attention output [B, f*s, H, D],
        with this rank's cache written and attended when there is one (plain Block semantics)."""
        if self.group.strategy == "ring":
            if cache is not None:
                cache.write(layer, plan, k, v, rows)
                k, v = cache.keys_values(layer, plan, rows)
            return ring_attention(q, k, v, self.group)
        qh, kh, vh = seq_to_heads(torch.cat([q, k, v]), self.group).chunk(3)   # one all-to-all for all three
        if cache is not None:
            # seq_to_heads orders tokens rank-major; the cache's rows are frame-major.
            kh, vh = (self._frame_major(t, plan.num_frames) for t in (kh, vh))
            cache.write(layer, plan, kh, vh, rows)
            kh, vh = cache.keys_values(layer, plan, rows)
        return heads_to_seq(attention(qh, kh, vh, backend), self.group)

    def _frame_major(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """[B, N*f*s, H', D] (rank, frame, token) -> [B, f*N*s, H', D] (frame, rank, token) = natural order."""
        return x.unflatten(1, (self.group.size, frames, -1)).transpose(1, 2).flatten(1, 3)


__all__ = ["TokenSharding", "for_group", "make_rank_cache", "tokens_per_rank"]
