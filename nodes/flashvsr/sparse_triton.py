"""Block-sparse flash attention in Triton: each query block visits only the key blocks its mask keeps.

Same function as ``sparse_attention.masked_attention`` (scale D^-0.5, a query block with no kept
key block outputs 0), without ever forming the dense score matrix and without touching the key
blocks it skips, so the work scales with the mask's density. Layout: q [B, Lq, H, D], k/v
[B, Lk, H, D] in window order (last dim contiguous), lengths multiples of 128; the mask
[B, H, Lq/128, Lk/128] becomes, per (batch, head, query block), the list of kept key blocks in
ascending order and its length (``kept_blocks``), which is what the kernel loops over.

One program = BLOCK_M query rows of one (batch, head): the online-softmax loop of FlashAttention
(running max and sum in float32, exp2 with the scale folded in) over the kept blocks, each in
128 / BLOCK_N tiles. Head dims that are not a power of two are padded in registers (masked loads).
float32 inputs take IEEE dots (no TF32), so the kernel can be checked tightly against the
reference; bf16/fp16 take the tensor cores.

``TRITON_INTERPRET=1`` runs the kernel on the CPU (tests/test_flashvsr_triton.py uses it on tiny
shapes); on CUDA a few tile configs are autotuned per head dim and dtype.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

BLOCK = 128
LOG2E = 1.4426950408889634


@triton.jit
def _block_sparse_fwd(Q, K, V, O, IDX, CNT, scale_log2,
                      s_qb, s_ql, s_qh, s_kb, s_kl, s_kh, s_vb, s_vl, s_vh, s_ob, s_ol, s_oh,
                      s_ib, s_ih, s_iq, s_cb, s_ch, H,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_block = (pid_m * BLOCK_M) // KV_BLOCK
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :], mask=d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    count = tl.load(CNT + b * s_cb + h * s_ch + q_block)
    idx_row = IDX + b * s_ib + h * s_ih + q_block * s_iq
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    for i in range(0, count):
        kb = tl.load(idx_row + i)
        for j in tl.static_range(KV_BLOCK // BLOCK_N):
            offs_n = kb * KV_BLOCK + j * BLOCK_N + tl.arange(0, BLOCK_N)
            k = tl.load(k_base + offs_n[None, :] * s_kl + offs_d[:, None], mask=d_ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, k, input_precision="ieee")
            else:
                s = tl.dot(q, k)
            s = s * scale_log2
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * s_vl + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]   # no kept block: acc = 0, out = 0
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=d_ok[None, :])


_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in ((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3))]
_tuned = triton.autotune(_CONFIGS, key=["HEAD_DIM", "IEEE"])(_block_sparse_fwd)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kept_blocks(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, nq, nk] bool -> (index [B, H, nq, nk] int32: kept key blocks first, ascending; count [B, H, nq])."""
    m = block_mask.to(torch.bool)
    count = m.sum(-1, dtype=torch.int32)
    order = torch.sort(m.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return order.to(torch.int32).contiguous(), count.contiguous()


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, H, D] (window order), block_mask [B, H, Lq/128, Lk/128] -> [B, Lq, H, D]."""
    b, lq, nh, d = q.shape
    lk = k.shape[1]
    if lq % BLOCK or lk % BLOCK:
        raise ValueError(f"sequence lengths {lq}, {lk} must be multiples of {BLOCK}")
    if tuple(block_mask.shape) != (b, nh, lq // BLOCK, lk // BLOCK):
        raise ValueError(f"block mask {tuple(block_mask.shape)} does not fit q {tuple(q.shape)}, k {tuple(k.shape)}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    index, count = kept_blocks(block_mask)
    scale = (1.0 / math.sqrt(d) if scale is None else scale) * LOG2E
    ieee = q.dtype == torch.float32
    args = (q, k, v, out, index, count, scale,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            index.stride(0), index.stride(1), index.stride(2), count.stride(0), count.stride(1), nh)
    meta = dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), KV_BLOCK=BLOCK, IEEE=ieee)
    if interpreting() or not q.is_cuda:
        _block_sparse_fwd[(lq // 64, b * nh)](*args, BLOCK_M=64, BLOCK_N=64, **meta)
    else:
        _tuned[lambda m: (lq // m["BLOCK_M"], b * nh)](*args, **meta)
    return out
