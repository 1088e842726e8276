"""FlashVSR's block-sparse self-attention: which 128-token blocks a query block attends, and the attention.

Tokens are grouped into (2, 8, 8) windows (2 latent frames x 8 x 8 tokens = 128 tokens = one
attention block); a "temporal block" is the set of windows of 2 latent frames. Everything here
works in WINDOW ORDER ([B, n_windows * 128, H, D], windows ordered (t, row, col), tokens inside a
window (t, row, col)), which is how the cache stores keys too.

The draft mask (upstream ``generate_draft_block_mask``), per batch item and head:
  1. mean of q and of k over each window (one 'summary token' per block);
  2. scores = q_mean . k_mean / sqrt(D), plus -inf outside the local band: window (r, c) may see
     (r', c') iff r - R//2 <= r' <= r - R//2 + R - 1 (same for c), R = local_range, NOT clamped at
     the grid border ('normal_slide'), the same for every pair of temporal blocks;
  3. softmax over all key windows;
  4. per (head, query temporal block), over the flattened (its query windows x all key windows)
     matrix: keep the entries STRICTLY greater than the (k'+1)-th largest, k' = min(n - 1, topk).
     Banded-out entries are exactly 0 after the softmax, so fewer than k' blocks may be kept and a
     query block may keep none: its output is 0 (the CUDA kernel's early exit), not NaN.

The attention over the kept blocks has two implementations: ``masked_attention`` (dense scores
with the block mask expanded to tokens; exact, any device: the reference and the CPU path) and
the Triton kernel of ``sparse_triton`` (CUDA). ``block_sparse_attention`` picks one.
"""
from __future__ import annotations

import math

import torch

from nodes.common.attention import attention

WINDOW = (2, 8, 8)           # latent frames x token rows x token cols of one block (upstream hard-codes it)
BLOCK = WINDOW[0] * WINDOW[1] * WINDOW[2]   # 128 tokens
KERNELS = ("auto", "triton", "masked")


def check_grid(f: int, h: int, w: int) -> None:
    """The token grid (frames, rows, cols) must tile into (2, 8, 8) windows."""
    wf, wh, ww = WINDOW
    if f % wf or h % wh or w % ww:
        raise ValueError(f"token grid {f}x{h}x{w} does not tile into {wf}x{wh}x{ww} windows: FlashVSR needs an "
                         f"even number of latent frames and frames whose pixel sizes are multiples of "
                         f"{wh * 16}x{ww * 16}")


def to_windows(x: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
    """[B, f*h*w, ...] token order (f, h, w) -> [B, f*h*w, ...] window order."""
    wf, wh, ww = WINDOW
    rest = x.shape[2:]
    y = x.reshape(x.shape[0], f // wf, wf, h // wh, wh, w // ww, ww, *rest)
    y = y.permute(0, 1, 3, 5, 2, 4, 6, *range(7, 7 + len(rest)))
    return y.reshape(x.shape)


def from_windows(x: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``to_windows``."""
    wf, wh, ww = WINDOW
    rest = x.shape[2:]
    y = x.reshape(x.shape[0], f // wf, h // wh, w // ww, wf, wh, ww, *rest)
    y = y.permute(0, 1, 4, 2, 5, 3, 6, *range(7, 7 + len(rest)))
    return y.reshape(x.shape)


def local_window_mask(rows: int, cols: int, local_range: int, device=None) -> torch.Tensor:
    """[rows*cols, rows*cols] bool: which spatial windows a window may attend ('normal_slide' band)."""
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    lo_r, lo_c = r - local_range // 2, c - local_range // 2
    in_r = (r[None, :] >= lo_r[:, None]) & (r[None, :] <= lo_r[:, None] + local_range - 1)
    in_c = (c[None, :] >= lo_c[:, None]) & (c[None, :] <= lo_c[:, None] + local_range - 1)
    return in_r & in_c


def topk_blocks(topk_ratio: float, h: int, w: int) -> int:
    """Upstream's budget: int(spatial_windows^2 * topk_ratio) - 1 blocks per (head, query temporal block)."""
    spatial = WINDOW[0] * h * w // BLOCK
    return int(spatial * spatial * topk_ratio) - 1


def draft_block_mask(q: torch.Tensor, k: torch.Tensor, local: torch.Tensor, topk: int) -> torch.Tensor:
    """q [B, Lq, H, D], k [B, Lk, H, D] in window order; local [nw, nw] (nw = windows per temporal
    block) -> block mask [B, H, Lq/128, Lk/128] bool. Scores in float32 (float64 stays float64)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, lq, nh, d = q.shape
    qm = q.to(ct).unflatten(1, (-1, BLOCK)).mean(2)           # [B, nq, H, D]
    km = k.to(ct).unflatten(1, (-1, BLOCK)).mean(2)           # [B, nk, H, D]
    nq, nk, nw = qm.shape[1], km.shape[1], local.shape[0]
    if nq % nw or nk % nw:
        raise ValueError(f"{nq} query / {nk} key windows are not whole temporal blocks of {nw} windows")
    scores = torch.einsum("bqhd,bkhd->bhqk", qm, km) / math.sqrt(d)
    band = local.to(q.device).repeat(nq // nw, nk // nw)
    scores = scores.masked_fill(~band, -math.inf)
    probs = torch.softmax(scores, dim=-1).reshape(b, nh, nq // nw, nw * nk)
    keep = min(probs.shape[-1] - 1, topk)
    threshold = torch.topk(probs, keep + 1, dim=-1).values[..., -1:]
    return (probs > threshold).reshape(b, nh, nq, nk)


def token_mask(block_mask: torch.Tensor) -> torch.Tensor:
    """[B, H, nq, nk] block mask -> [B, H, nq*128, nk*128] token mask."""
    return block_mask.repeat_interleave(BLOCK, dim=2).repeat_interleave(BLOCK, dim=3)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor) -> torch.Tensor:
    """Exact block-sparse attention as dense masked attention (scale D^-0.5; query blocks with no kept key
    block give 0). q [B, Lq, H, D], k/v [B, Lk, H, D] window order -> [B, Lq, H, D]."""
    out, _ = attention(q, k, v, return_lse=True, mask=token_mask(block_mask))
    return out


def block_sparse_attention(q, k, v, block_mask, kernel: str = "auto") -> torch.Tensor:
    """The attention over the kept blocks: the Triton kernel on CUDA (``auto``/``triton``), else the masked
    dense path."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown sparse kernel {kernel!r}; choose one of {KERNELS}")
    if kernel == "triton" or (kernel == "auto" and q.is_cuda):
        from .sparse_triton import sparse_attention
        return sparse_attention(q, k, v, block_mask)
    return masked_attention(q, k, v, block_mask)
