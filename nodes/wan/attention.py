"""One switch for every scaled-dot-product attention of the Wan DiT.

Tensors are [B, L, H, D] (Wan's layout) everywhere; the torch SDPA backends
want [B, H, L, D], so the transpose lives here and nowhere else. No mask, no
causal flag: the causal model gets causality from what it puts in the KV cache.
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "flash_attn")

_SDPA = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# cuDNN first where it applies (bf16/fp16 on CUDA); the others catch fp32 / odd head dims.
_AUTO_CUDA = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
              SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _sdpa(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v for q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]."""
    if backend == "auto":
        if q.is_cuda:
            with sdpa_kernel(_AUTO_CUDA, set_priority=True):
                return _sdpa(q, k, v)
        return _sdpa(q, k, v)
    if backend == "flash_attn":
        from flash_attn import flash_attn_func  # optional dependency, imported on use

        return flash_attn_func(q, k, v)
    if backend not in _SDPA:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    with sdpa_kernel(_SDPA[backend]):
        return _sdpa(q, k, v)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention plus its log-sum-exp, so partial attentions over key shards can be merged.

    Returns out [B, Lq, H, D] in q's dtype and lse [B, H, Lq] float32 (natural log of the
    softmax denominator, scores scaled by 1/sqrt(D)). Computed in float32 (float64 stays
    float64) by the plain math formula: this is the reference path, not the fast one.
    """
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh, kh, vh = (t.transpose(1, 2).to(ct) for t in (q, k, v))
    scores = (qh @ kh.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse.unsqueeze(-1)) @ vh
    return out.transpose(1, 2).to(q.dtype), lse.float()
