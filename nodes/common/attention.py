"""The one scaled-dot-product attention entry point of every model in fd.

Tensors are [B, L, H, D] everywhere (the DiT layout); torch SDPA wants [B, H, L, D], so the
transposes live here and nowhere else. No causal flag: a causal model gets causality from
what it puts in its KV cache.

``return_lse=True`` also returns the log-sum-exp of the scaled scores ([B, Lq, H], float32,
natural log), which is what lets partial attentions over disjoint key sets be merged exactly
(ring attention, nodes/common/ring.py). It takes the fused kernels that expose the lse where
they apply and the explicit float32 formula elsewhere (or under a mask). A query with no
visible key (empty key set, or a fully masked row) gets out = 0 and lse = -inf, which merges
as "contributes nothing".
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "flash_attn", "flash4")

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


def flash4_available() -> bool:
    """FlashAttention-4 (the CuTe-DSL kernels of the ``flash-attn-4`` wheel, module ``flash_attn.cute``)."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):
        return False


def backend_problem(backend: str, device: torch.device | str) -> str | None:
    """Why ``backend`` can't run on ``device`` (None when it can): what validation says before a weight is read."""
    device = torch.device(device)
    if backend not in BACKENDS:
        return f"unknown attention backend {backend!r}; choose one of {BACKENDS}"
    if backend in ("flash4", "flash_attn", "cudnn", "flash") and device.type != "cuda":
        return f"attention backend {backend!r} needs a CUDA device (this node runs on {device.type}); use auto or math"
    if backend == "flash4" and not flash4_available():
        return ("attention backend 'flash4' needs FlashAttention-4: pip install -e '.[flash]' "
                "(the flash-attn-4 wheel, module flash_attn.cute)")
    if backend == "flash_attn" and not flash_attn_available():
        return "attention backend 'flash_attn' needs the flash-attn package: pip install flash-attn"
    return None


def _sdpa(q, k, v, scale):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto", *,
              scale: float | None = None, return_lse: bool = False, mask: torch.Tensor | None = None):
    """softmax(q k^T * scale) v for q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]
    (scale defaults to 1/sqrt(D)). With ``return_lse``: (out, lse [B, Lq, H] float32); ``mask``
    (boolean [.., Lq, Lk], True = attend) is only taken on that path."""
    if backend == "auto" and q.is_cuda:
        backend = auto_backend(q.device, q.shape[-1])
    if backend == "flash4" and q.dtype not in (torch.float16, torch.bfloat16):
        backend = "auto"                                   # FA4 is a half-precision kernel; fp32 takes SDPA
    if return_lse:
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        if backend == "flash4" and mask is None and k.shape[1] > 0:
            return _flash4(q, k, v, scale, True)
        return _with_lse(q, k, v, scale, mask)
    if mask is not None:
        raise ValueError("a mask needs return_lse=True (the explicit path)")
    if backend == "auto":
        if q.is_cuda:
            with sdpa_kernel(_AUTO_CUDA, set_priority=True):
                return _sdpa(q, k, v, scale)
        return _sdpa(q, k, v, scale)
    if backend == "flash4":
        return _flash4(q, k, v, scale, False)
    if backend == "flash_attn":
        from flash_attn import flash_attn_func  # optional dependency, imported on use

        return flash_attn_func(q, k, v, softmax_scale=scale)
    if backend not in _SDPA:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    with sdpa_kernel(_SDPA[backend]):
        return _sdpa(q, k, v, scale)


@functools.lru_cache(maxsize=None)
def auto_backend(device: torch.device, head_dim: int | None = None) -> str:
    """The fastest backend measured on this GPU's architecture (at ``head_dim``, when given) that is installed
    here (attention_table.py; "auto" = torch's own cuDNN-first SDPA order). Cached: neither changes in a process."""
    from .attention_table import fastest_measured
    cap = torch.cuda.get_device_capability(device)
    return fastest_measured(cap, installed=lambda name: backend_problem(name, device) is None, head_dim=head_dim)


def _flash4_func():
    """FA4 JIT-compiles its kernels on first use (seconds per shape family); its on-disk cache, which it reads
    only when enabled before the import, makes a second process start warm. Set here unless the user chose."""
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "fd", "flash4"))
    from flash_attn.cute import flash_attn_func  # optional dependency (the `flash` extra), imported on use
    return flash_attn_func


def _flash4(q, k, v, scale, return_lse):
    """FlashAttention-4 takes the DiT layout [B, L, H, D] as it is; its lse is [B, H, Lq] (natural log)."""
    out = _flash4_func()(q, k, v, softmax_scale=scale, return_lse=return_lse)
    out, lse = out if isinstance(out, tuple) else (out, None)
    if not return_lse:
        return out
    return out, lse.transpose(1, 2).float()


def _with_lse(q, k, v, scale, mask):
    B, Lq, H, _ = q.shape
    if k.shape[1] == 0:
        return q.new_zeros(B, Lq, H, v.shape[-1]), q.new_full((B, Lq, H), -math.inf, dtype=torch.float32)
    if mask is None:
        fused = _fused_with_lse(q, k, v, scale)
        if fused is not None:
            return fused
    return _explicit_with_lse(q, k, v, scale, mask)


def _fused_with_lse(q, k, v, scale):
    """SDPA kernels that also return the lse, or None where none applies (then: explicit scores)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    D = q.shape[-1]
    if q.device.type == "cpu" and q.dtype == torch.float32:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, False, scale=scale)
    elif q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False, False, scale=scale)[:2]
    elif q.device.type == "cuda" and D % 8 == 0:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, 0.0, False,
                                                                          scale=scale)[:2]
    else:
        return None
    # The memory-efficient kernel pads lse's query axis to a multiple of 32: keep the real rows.
    return out.transpose(1, 2), lse[..., : q.shape[1]].transpose(1, 2).float()


def _explicit_with_lse(q, k, v, scale, mask):
    """The plain formula in float32 (float64 stays float64): the reference path, not the fast one."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(ct), k.to(ct)) * scale
    if mask is not None:
        s = s.masked_fill(~mask.to(torch.bool), -math.inf)
    lse = torch.logsumexp(s, dim=-1)                                    # [B, H, Lq]; -inf on empty rows
    p = torch.exp(s - finite_or_zero(lse).unsqueeze(-1))                # empty rows: exp(-inf) = 0, no NaN
    out = torch.einsum("bhqk,bkhd->bqhd", p, v.to(ct))
    return out.to(q.dtype), lse.transpose(1, 2).float().contiguous()


def finite_or_zero(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


# --- FP8 (issue 19): an additive path; the bf16 entry point above is unchanged --------------------------------
ATTENTION_PRECISIONS = ("auto", "fp8")


def attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                  scaling: str = "tensor", runner=None, out: str = "fp8", quant=None,
                  kv_scales: tuple | None = None, as_rows: bool = False):
    """softmax(q k^T * scale) v with Q, K, V (and P, and O unless ``out='bf16'``) in e4m3, [B, L, H, D] in and
    out (q's dtype). ``scaling``: 'tensor' or 'head' amax scales, computed on the device (nodes/common/
    fp8_attention.py says what each folds where). ``runner``: a ``CudnnFp8Attention`` (it owns the cuDNN
    plans); None runs the float32 emulation of the same arithmetic (CPU, tests). ``kv_scales`` = (ks, vs): k and v
    are already e4m3 with one scale per (token, head) (an FP8 KV cache), rescaled instead of re-quantised.
    ``quant``: a compiled ``fp8_attention.quantize_qkv`` (``requantize_qkv`` with kv_scales), default eager.
    ``as_rows``: return the e4m3 output as it is, as the ``QuantizedRows`` an Fp8Linear takes (tensor scaling,
    e4m3 output only)."""
    from .fp8_attention import fp8_attention, fp8_attention_rows
    if as_rows:
        if scaling != "tensor" or out != "fp8":
            raise ValueError(f"as_rows needs tensor scaling and an fp8 output, got {scaling!r} / {out!r}")
        return fp8_attention_rows(q, k, v, scale=scale, runner=runner, quant=quant, kv_scales=kv_scales)
    return fp8_attention(q, k, v, scale=scale, scaling=scaling, runner=runner, out=out, quant=quant,
                         kv_scales=kv_scales)
