"""The FlashVSR DiT: Wan 2.1's DiT with LQ tokens added per layer and block-sparse windowed self-attention.

Everything but the self-attention is Wan's (nodes/wan/dit.py: patch embedding, AdaLN blocks with
cross-attention to the prompt, head; parameter names are the checkpoint's, so
``diffusion_pytorch_model_streaming_dmd.safetensors`` loads with strict=True). The self-attention
keeps Wan's projections and qk-norm + RoPE, then works on (2, 8, 8)-token windows
(nodes/flashvsr/sparse_attention.py): the chunk's windows attend the cached windows of previous
chunks plus their own, through the draft block mask (``sparse``) or fully (``dense``). The cache
(``WindowKVCache``) is FlashVSR's, not Wan's ring: post-RoPE K/V windows of whole temporal blocks,
the oldest one dropped per call once more than kv_len are held.

One call = one chunk (``FlashVSRDiT.chunk``); the streaming order (6 latent frames, then 2 per
call, RoPE positions, LQ projection) lives in nodes/flashvsr/stream.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nodes.common.attention import attention
from nodes.wan.dit import CallContext, CrossCache, Projections, WanDiT, _norm_weight

from .sparse_attention import (WINDOW, block_sparse_attention, check_grid, draft_block_mask, from_windows,
                               local_window_mask, to_windows)


class WindowKVCache:
    """Per layer: post-RoPE key/value windows [B, n*128, H, D] (window order, oldest temporal block first)."""

    def __init__(self, num_layers: int, kv_len: int):
        self.kv_len = kv_len
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def reset(self) -> None:
        self.k = [None] * len(self.k)
        self.v = [None] * len(self.v)

    def attend(self, layer: int, k: torch.Tensor, v: torch.Tensor, block_tokens: int):
        """Keys/values to attend (cache + this chunk's windows); keeps them, less the oldest temporal block
        (``block_tokens`` tokens) when more than kv_len blocks are held."""
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], 1), torch.cat([self.v[layer], v], 1)
        drop = block_tokens if k.shape[1] // block_tokens > self.kv_len else 0
        self.k[layer], self.v[layer] = k[:, drop:], v[:, drop:]
        return k, v


@dataclass
class SparseContext(CallContext):
    """CallContext plus what FlashVSR's self-attention needs for one chunk."""
    grid: tuple[int, int, int] = (0, 0, 0)            # token grid (frames, rows, cols)
    windows: WindowKVCache | None = None
    attention_mode: str = "sparse"
    kernel: str = "auto"
    local: torch.Tensor | None = None                 # [nw, nw] spatial window band
    topk: int = 0
    masks: list | None = field(default=None)          # debug: every layer's block mask is appended here


class WindowedSelfAttention(Projections):
    """Wan's self-attention projections over FlashVSR's window cache and block-sparse attention."""

    def forward(self, h, rope, ctx: SparseContext):
        kern = ctx.kernels
        f, hh, ww = ctx.grid
        q = kern.norm_rope(self.q(h), _norm_weight(self.norm_q), self.eps, self.num_heads, *rope)
        k = kern.norm_rope(self.k(h), _norm_weight(self.norm_k), self.eps, self.num_heads, *rope)
        v = self.heads(self.v(h))
        q, k, v = (to_windows(t, f, hh, ww) for t in (q, k, v))
        block_tokens = WINDOW[0] * hh * ww
        k, v = ctx.windows.attend(self.layer, k, v, block_tokens)
        if ctx.attention_mode == "dense":
            y = attention(q, k, v, ctx.backend)
        else:
            mask = draft_block_mask(q, k, ctx.local, ctx.topk)
            if ctx.masks is not None:
                ctx.masks.append(mask)
            y = block_sparse_attention(q, k, v, mask, ctx.kernel)
        return self.o(from_windows(y, f, hh, ww).flatten(2))


class FlashVSRDiT(WanDiT):
    """WanDiT whose blocks' self-attention is ``WindowedSelfAttention`` (same parameters)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.local_masks: dict[tuple, torch.Tensor] = {}   # (rows, cols, range, device) -> band, built once
        for i, blk in enumerate(self.blocks):
            blk.self_attn = WindowedSelfAttention(cfg.dim, cfg.num_heads, cfg.qk_norm, cfg.eps, i)

    def prepare_prompt(self, context: torch.Tensor) -> CrossCache:
        """Cross-attention K/V of the fixed prompt embedding [B, L, text_dim]: every row, no padding
        (upstream reinit_cross_kv)."""
        c = self.text_embedding(context.to(self.dtype))
        kv = [blk.cross_attn.kv(c) for blk in self.blocks]
        return CrossCache([k for k, _ in kv], [v for _, v in kv])

    def chunk(self, x: torch.Tensor, cross: CrossCache, time_terms: tuple[torch.Tensor, torch.Tensor],
              frame_start: int, windows: WindowKVCache, lq: list[torch.Tensor] | None, *,
              attention_mode: str = "sparse", kernel: str = "auto", local_range: int = 11,
              topk_ratio: float = 2.0, masks: list | None = None) -> torch.Tensor:
        """One streaming call: x [B, C, f, H, W] latents at RoPE time ``frame_start``; ``time_terms`` =
        embed_time(t) (e, e0); ``lq`` per layer [B, f*h*w, dim] added before blocks 0..len-1. Reads and
        updates ``windows``. Returns the flow prediction [B, out_dim, f, H, W] float32."""
        x = self.patch_embedding(x.to(self.dtype))
        b, _, f, h, w = x.shape
        check_grid(f, h, w)
        tokens = x.flatten(2).transpose(1, 2).float()
        e, e0 = time_terms
        rope = self.rope_table.get(frame_start, f, h, w, x.device)
        spatial = (h // WINDOW[1]) * (w // WINDOW[2])
        ctx = SparseContext(cross, self.backend, self.kernels, grid=(f, h, w), windows=windows,
                            attention_mode=attention_mode, kernel=kernel,
                            local=_local_mask(self, h // WINDOW[1], w // WINDOW[2], local_range, x.device),
                            topk=int(spatial * spatial * topk_ratio) - 1, masks=masks)
        lq = lq or []
        if len(lq) > len(self.blocks):
            raise ValueError(f"{len(lq)} LQ layers for a DiT of {len(self.blocks)} blocks")
        for i, blk in enumerate(self.blocks):
            if i < len(lq):
                if lq[i].shape[1] != tokens.shape[1]:
                    raise ValueError(f"LQ tokens {tuple(lq[i].shape)} do not match the chunk's {f}x{h}x{w} token grid")
                tokens = tokens + lq[i].float()
            tokens = blk(tokens, e0, rope, ctx)
        out = self.head(tokens, e)
        pt, ph, pw = self.cfg.patch_size
        out = out.view(b, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, -1, f * pt, h * ph, w * pw)


def _local_mask(model: FlashVSRDiT, rows: int, cols: int, local_range: int, device) -> torch.Tensor:
    key = (rows, cols, local_range, str(device))
    if key not in model.local_masks:
        model.local_masks[key] = local_window_mask(rows, cols, local_range, device=device)
    return model.local_masks[key]

