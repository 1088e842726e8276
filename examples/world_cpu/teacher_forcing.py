"""Teacher-forced training forward of the world DiT: every block of a clip in one call.

At inference (nodes/world/causal.py through ar.sampler) block b is denoised against a KV cache
holding the clean previous blocks of the window, then committed clean. Training runs a whole clip
at once with the same attention pattern: the sequence is [clean frames | noisy frames] (both at
the frames' own RoPE positions, each with its own timestep), and

  - a clean token of block b sees the clean tokens of blocks b-W+1 .. b   (the context pass),
  - a noisy token of block b sees the clean tokens of blocks b-W+1 .. b-1 and the noisy block b,

W = window_frames / frames_per_block. Attention is computed per block over just its window (a
[2P, (W+1)P] score block, P tokens per block), not over the whole [2L, 2L] square.

The DiT's modules are used as they are (patch and time embeddings, the action/camera path,
cross-attention, FFN, head); only the self-attention step is written out here, because it needs a
mask. It runs through torch's fused SDPA with a boolean mask (training only: the runtime's
attention goes through nodes/common/attention.py with no mask, its causality coming from the
cache). tests/test_world_model.py checks this forward against the cached causal rollout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nodes.wan.dit import EAGER, CallContext, RMSNorm
from nodes.world.model import ActionWanDiT


def window_mask(blocks: int, window: int, tokens: int, device) -> torch.Tensor:
    """[blocks, 2P, (W+1)P] boolean (True = attend): queries [clean P | noisy P] of block b; keys the W
    clean window slots (block b-W+1+j in slot j) and then the noisy block b."""
    b = torch.arange(blocks, device=device)[:, None]
    slot = torch.arange(window, device=device)[None, :]
    valid = (b - (window - 1) + slot) >= 0                                     # [nb, W]
    clean_q = torch.cat([valid, torch.zeros(blocks, 1, dtype=torch.bool, device=device)], 1)
    noisy_q = torch.cat([valid & (slot < window - 1), torch.ones(blocks, 1, dtype=torch.bool, device=device)], 1)
    rows = torch.stack([clean_q, noisy_q], 1)                                  # [nb, 2, W+1]
    return rows.repeat_interleave(tokens, 1).repeat_interleave(tokens, 2)    # [nb, 2P, (W+1)P]


def _windowed_attention(q, k, v, blocks: int, window: int, mask: torch.Tensor) -> torch.Tensor:
    """q/k/v [B, 2L, H, D] ([clean | noisy]) -> [B, 2L, H, D] under the block-window pattern."""
    B, L2, H, D = q.shape
    P = L2 // 2 // blocks

    def split(x):   # -> clean, noisy: [B, nb, P, H, D]
        c, n = x.chunk(2, dim=1)
        return c.unflatten(1, (blocks, P)), n.unflatten(1, (blocks, P))

    qc, qn = split(q)
    kc, kn = split(k)
    vc, vn = split(v)
    pad = lambda x: F.pad(x, (0, 0, 0, 0, 0, 0, window - 1, 0))  # noqa: E731  (W-1 empty blocks in front)
    kw = torch.cat([pad(kc)[:, j:j + blocks] for j in range(window)] + [kn], dim=2)   # [B, nb, (W+1)P, H, D]
    vw = torch.cat([pad(vc)[:, j:j + blocks] for j in range(window)] + [vn], dim=2)
    qq = torch.cat([qc, qn], dim=2)                                                    # [B, nb, 2P, H, D]
    to_sdpa = lambda x: x.flatten(0, 1).transpose(1, 2)  # noqa: E731  [B*nb, H, len, D]
    m = mask[None].expand(B, -1, -1, -1).flatten(0, 1)[:, None]                       # [B*nb, 1, 2P, (W+1)P]
    y = F.scaled_dot_product_attention(to_sdpa(qq), to_sdpa(kw), to_sdpa(vw), attn_mask=m)
    y = y.transpose(1, 2).unflatten(0, (B, blocks))                                   # [B, nb, 2P, H, D]
    yc, yn = y.chunk(2, dim=2)
    return torch.cat([yc.flatten(1, 2), yn.flatten(1, 2)], dim=1)


def _block(blk, x, cond, rope, ctx: CallContext, attend):
    """nodes.wan.dit.Block.forward with the self-attention replaced by ``attend(q, k, v)``."""
    kern, fm, wd, eps = EAGER, cond.shape[1], blk.ffn[0].weight.dtype, blk.eps
    shift1, scale1, gate1, shift2, scale2, gate2 = (blk.modulation.float().unsqueeze(1) + cond).unsqueeze(3).unbind(2)
    sa = blk.self_attn
    h = kern.modulate(x, shift1, scale1, fm, eps, wd)
    nw = lambda n: n.weight if isinstance(n, RMSNorm) else None  # noqa: E731
    q = kern.norm_rope(sa.q(h), nw(sa.norm_q), sa.eps, sa.num_heads, *rope)
    k = kern.norm_rope(sa.k(h), nw(sa.norm_k), sa.eps, sa.num_heads, *rope)
    v = sa.heads(sa.v(h))
    y = attend(q, k, v.to(q.dtype))
    x = kern.gated_add(x, sa.o(y.flatten(2).to(h.dtype)), gate1, fm)
    x = blk.inject_camera(x, ctx.camera)
    n3 = blk.norm3
    h = kern.ln_cast(x, getattr(n3, "weight", None), getattr(n3, "bias", None), getattr(n3, "eps", eps), wd)
    x = kern.add_float(x, blk.cross_attn(h, ctx))
    return kern.gated_add(x, blk.ffn(kern.modulate(x, shift2, scale2, fm, eps, wd)), gate2, fm)


def teacher_forced_flow(model: ActionWanDiT, clean: torch.Tensor, noisy: torch.Tensor, t_clean: torch.Tensor,
                        t_noisy: torch.Tensor, actions: torch.Tensor, frames_per_block: int,
                        window_frames: int) -> torch.Tensor:
    """clean / noisy latents [B, F, C, H, W], their timesteps [B, F], actions [B, F] ->
    the flow predicted for the noisy frames [B, F, C, H, W] (float32)."""
    B, F_, C, H, W = noisy.shape
    if F_ % frames_per_block or window_frames % frames_per_block:
        raise ValueError(f"{F_} frames / window {window_frames} must be multiples of {frames_per_block}")
    blocks, window = F_ // frames_per_block, window_frames // frames_per_block
    x = model.patch_embedding(torch.cat([clean, noisy], 1).transpose(1, 2).to(model.dtype))   # [B, d, 2F, h, w]
    h, w = x.shape[-2:]
    n = h * w
    tokens = x.flatten(2).transpose(1, 2).float()
    e, e0 = model.embed_time(torch.cat([t_clean, t_noisy], 1).float())
    cos, sin = model.rope_table.get(0, F_, h, w, noisy.device)
    rope = (torch.cat([cos, cos]), torch.cat([sin, sin]))
    ids = actions.long()[:, :, None, None].expand(B, F_, h, w)
    cam = model.embed_camera(torch.cat([ids, ids], 1))
    cross = model.prepare_cross(model.context(B))
    ctx = CallContext(cross, model.backend, EAGER, camera=cam)
    mask = window_mask(blocks, window, frames_per_block * n, noisy.device)
    attend = lambda q, k, v: _windowed_attention(q, k, v, blocks, window, mask)  # noqa: E731
    for blk in model.blocks:
        tokens = _block(blk, tokens, e0, rope, ctx, attend)
    out = model.head(tokens[:, F_ * n:], e[:, F_:])                 # the noisy half only
    pt, ph, pw = model.cfg.patch_size
    out = out.view(B, F_, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return out.reshape(B, -1, F_ * pt, h * ph, w * pw).transpose(1, 2)
