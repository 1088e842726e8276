"""Building blocks of the Wan 2.1 causal video VAE (encoder and decoder trunks).

Parameter names and shapes follow upstream ``wan/modules/vae.py`` so the real
``Wan2.1_VAE.pth`` loads strictly. The temporal state differs by design: every
temporal-kernel-3 conv reads its history from a ``ConvCache`` that the caller owns
(one fixed-size tensor per conv, updated in place), instead of a list hung on the
module. That keeps streaming state explicit and the shapes static after the first
chunk (CUDA-graph friendly).

Equivalence with upstream: upstream starts every cache as ``None`` and zero-pads the
missing history, which is exactly a zero-initialised 2-frame history. Only the two
temporal resamplers treat the very first frame of a stream specially (the decoder's
'Rep' path passes it through without the temporal conv; the encoder's stride-2
temporal conv also passes it through); ``ConvCache.first`` marks that chunk.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nodes.common.conv import subpixel_weights

HISTORY = 2  # frames of past input a temporal-kernel-3 causal conv needs
# cuBLAS bf16 x bf16 -> float32 batched GEMM (torch.bmm's out_dtype); without it the attention stays on SDPA
_BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")


def _zeros_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Zero history shaped like ``x`` with ``frames`` time steps, allocated in x's memory format (zeros made
    contiguous then converted cost a permuting copy per cache: 5.2 ms of a W2 decode on an H100)."""
    b, c, _, h, w = x.shape
    return _channels_last_like(x, (b, c, frames, h, w)).zero_()


class ConvCache:
    """Per-conv temporal history of one stream, consumed in forward order.

    ``tensors`` is the caller's list (one entry per cached conv, decoder order equals
    upstream's ZERO_VAE_CACHE order). Missing entries are created as zeros on first
    use; later calls update them in place so their storage never moves.
    """

    def __init__(self, tensors: list[torch.Tensor], first: bool, fused: "FusedOps | None" = None):
        self.tensors = tensors
        self.first = first
        self.fused = fused
        self.index = 0

    def slot(self, like: torch.Tensor, frames: int) -> torch.Tensor:
        if self.index == len(self.tensors):
            self.tensors.append(_zeros_frames(like, frames))
        t = self.tensors[self.index]
        self.index += 1
        return t

    def extend(self, x: torch.Tensor, frames: int = HISTORY) -> torch.Tensor:
        """Return cat(history, x) along time and roll the history to its last frames."""
        hist = self.slot(x, frames)
        xin = torch.cat([hist, x], dim=2)
        hist.copy_(xin[:, :, -frames:])
        return xin

    def norm_conv(self, conv: nn.Conv3d, x: "torch.Tensor | PendingSum", gamma: torch.Tensor,
                  bias: torch.Tensor | None, keep_input: bool = False):
        """conv([history | silu(rms_norm(x + bias))]) on the fused path, rolling the history; returns
        (output, bias still to add), as ``FusedOps.norm_conv`` (``x`` may be a block's ``PendingSum``)."""
        like = x.h if isinstance(x, PendingSum) else x
        return self.fused.norm_conv(conv, self.slot(like, HISTORY), x, gamma, bias, keep_input)


class PendingSum(NamedTuple):
    """A residual block's output not yet written: conv output ``y`` + its ``bias`` + the shortcut ``h``. The next
    block's norm window adds it as it reads (``FusedOps.residual_window``), which saves reading the sum back: one
    full pass over the block's output, the largest tensors of the decoder."""
    y: torch.Tensor
    bias: torch.Tensor | None
    h: torch.Tensor


def _channels_last_like(x: torch.Tensor, shape) -> torch.Tensor:
    """An empty tensor of ``shape`` in x's memory format (channels_last_3d when x is)."""
    cl = x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)
    return torch.empty(shape, dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last_3d if cl else torch.contiguous_format)


def _rms_silu(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(RMS_norm(x + bias)) in float32, as plain ops that Inductor fuses into one kernel."""
    c = x.shape[1]
    xf = x.float()
    if bias is not None:
        xf = xf + bias.float().view(1, c, 1, 1, 1)
    y = xf * torch.rsqrt(xf.square().mean(1, keepdim=True) + 1e-24 / c) * gamma.float().view(1, c, 1, 1, 1)
    return F.silu(y).to(x.dtype)


def _window_compiled(hist, x, gamma, bias):
    xin = torch.cat([hist, _rms_silu(x, gamma, bias)], dim=2)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        xin = xin.contiguous(memory_format=torch.channels_last_3d)  # pin the layout cuDNN wants
    return xin


def _tap_sum(p, bias, cout: int, frames: int, pad_h: int, pad_w: int, dtype: torch.dtype):
    """The 3x3x3 conv from its per-tap products: p [B, cout*27, T+2, H, W] (tap-major, each tap a contiguous plane,
    so every read below is coalesced) holds x . W[o, :, dt, dh, dw] at every window pixel (plane o*27 + dt*9 + dh*3
    + dw); out[o, t, h, w] = sum of the 27 shifted taps (zero padded in space) + bias, summed in float32."""
    b, _, tt, h, w = p.shape
    kt = tt - frames + 1
    kh, kw = 2 * pad_h + 1, 2 * pad_w + 1
    pv = F.pad(p.float(), (pad_w, pad_w, pad_h, pad_h)).unflatten(1, (cout, kt, kh, kw))
    out = None
    for dt in range(kt):
        for dh in range(kh):
            for dw in range(kw):
                tap = pv[:, :, dt, dh, dw, dt:dt + frames, dh:dh + h, dw:dw + w]
                out = tap if out is None else out + tap
    if bias is not None:
        out = out + bias.float().view(1, cout, 1, 1, 1)
    return out.to(dtype)


def _tap_weights(conv: nn.Conv3d) -> torch.Tensor:
    """[O, C, kt, kh, kw] -> [O*kt*kh*kw, C] (row o*27 + dt*9 + dh*3 + dw), the left operand of the taps GEMM."""
    o, c, kt, kh, kw = conv.weight.shape
    return conv.weight.permute(0, 2, 3, 4, 1).reshape(o * kt * kh * kw, c).contiguous()


def _tap_products(w: torch.Tensor, xin: torch.Tensor) -> torch.Tensor:
    """W_taps @ x per batch: [B, C, T, H, W] (channels-last or not: flatten(2) is a view either way, read by the
    GEMM as it lies) -> [B, rows, T, H, W], contiguous: one plane per tap."""
    b, _, t, h, wd = xin.shape
    return torch.bmm(w.expand(b, -1, -1), xin.flatten(2)).view(b, w.shape[0], t, h, wd)


def _subpixel_3d(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The upsample conv's sub-pixel weights (nodes/common/conv.py) as a channels-last (1, 2, 2) conv3d kernel."""
    w4, bias = subpixel_weights(conv)
    return w4.unsqueeze(2).contiguous(memory_format=torch.channels_last_3d), bias


def _window_eager(hist, x, gamma, bias):
    b, c, t, h, w = x.shape
    xin = _channels_last_like(x, (b, c, hist.shape[2] + t, h, w))
    xin[:, :, : hist.shape[2]].copy_(hist)
    if bias is not None:
        x = x + bias.view(1, c, 1, 1, 1)
    y = F.rms_norm(x.movedim(1, -1), (c,), gamma.view(-1).to(x.dtype), eps=1e-24 / c).movedim(-1, 1)
    torch.ops.aten.silu.out(y, out=xin[:, :, hist.shape[2]:])
    return xin


def _residual(y, bias, h):
    return (y if bias is None else y + bias.view(1, -1, 1, 1, 1)) + h


def _residual_window(hist, y, bias, h, gamma):
    """The block output (rounded to its dtype, as when it is written) and the next conv's window from it.

    Also for the RGB head, which needs only the window: without the sum as an output, Inductor split the kernel in
    two (the norm's statistics, then the window), reading both parts twice."""
    x = _residual(y, bias, h)
    return _window_compiled(hist, x, gamma, None), x


def _scaled_softmax(s, scale: float, dtype: torch.dtype):
    return torch.softmax(s * scale, dim=-1).to(dtype)


def _scores(q, k):
    """q @ k^T in float32 or wider: bf16 / fp16 inputs on CUDA keep cuBLAS's float32 accumulator (out_dtype)."""
    wide = torch.promote_types(q.dtype, torch.float32)
    if q.is_cuda and q.dtype != wide:
        return torch.bmm(q, k.transpose(1, 2), out_dtype=wide)
    return torch.bmm(q.to(wide), k.to(wide).transpose(1, 2))


def _phases_to_pixels(y, bias, co: int, h: int, w: int):
    """A sub-pixel conv's output [b, 4co, t, h+1, w+1] (phase blocks 2a+c, bias not yet added) as the upsampled
    frames [b, co, t, 2h, 2w]: out pixel (2i+a, 2j+c) is phase 2a+c at (i+a, j+c), plus the conv's bias; one
    pass, written channels-last."""
    rows = [torch.stack([y[:, (2 * a + c) * co:(2 * a + c + 1) * co, :, a:a + h, c:c + w] for c in range(2)], -1)
            for a in range(2)]                                       # each [b, co, t, h, w, 2 (c)]
    out = torch.stack(rows, -3).flatten(5, 6).flatten(3, 4)         # [b, co, t, h, 2a, w, 2c] -> 2h, 2w
    if bias is not None:                                             # the sub-pixel bias repeats it per phase
        out = out.float() + bias[:co].float().view(1, co, 1, 1, 1)
    return out.to(y.dtype).contiguous(memory_format=torch.channels_last_3d)


def _frames_from_channels(y, bias):
    """The temporal upsample's conv output [b, 2c, t, h, w] (bias not yet added) as 2t frames of c channels:
    frame 2i is channels :c of step i, frame 2i+1 channels c:, as upstream's reshape; one pass, channels-last."""
    b, c2, t, h, w = y.shape
    if bias is not None:
        y = (y.float() + bias.float().view(1, c2, 1, 1, 1)).to(y.dtype)
    out = y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
    return out.contiguous(memory_format=torch.channels_last_3d)


class FusedOps:
    """The pointwise glue of the fused decoder path: norm+SiLU written straight into the
    conv's [history | new frames] window (no separate cat), bias + shortcut after a conv, and the
    upsamplers' reshuffles (sub-pixel phases -> pixels, channels -> frames) with their conv's bias in
    the same pass (four strided copies and a bias add before: 90.96 -> 87.72 ms per W1 block, H100).

    ``compile=True`` runs them through torch.compile so each is one kernel, and the convs
    then run without bias (the bias add is folded into the next pointwise kernel instead of
    cuDNN's separate pass). Dynamo's recompile limit is per code object, and one decoder
    has ~10 distinct shapes, so every shape gets its own copy of the function's code.

    ``fold_residuals``: a residual block hands on a ``PendingSum`` and the next block's (or the head's) norm window
    adds it as it reads; ``matmul_attention_min_dim``: head dims from which attention is two GEMMs and a softmax.

    ``tap_head``: a conv with fewer than 16 outputs (the RGB head, 96 -> 3: cuDNN runs it at ~20 TFLOP/s)
    becomes a GEMM to its 27 per-tap products, written tap-major, and their shifted sum in one pointwise kernel:
    the same sum in another order: 101.0 vs 102.9 ms per W1 block on an H100 (2026-12-06); tap-major instead of
    channels-last products took the W2 sum from 10.0 to 1.9 ms (its reads coalesce). ``StreamingDecoder``
    turns it on with ``compile`` (``make``). A time-folded conv2d for the 96-channel stage (513 vs 369 TFLOP/s
    for the conv alone in the probe) lost it all to writing its 3x-wide input, 110.1 vs 101.8 ms: not kept.
    """

    def __init__(self, compile: bool = False, mode: str | None = None, tap_head: bool = False,
                 fold_residuals: bool = True, matmul_attention_min_dim: int = 257):
        self.compiled = compile
        self.mode = mode
        self.tap_head = tap_head
        self.fold_residuals = fold_residuals
        self.matmul_attention_min_dim = matmul_attention_min_dim
        self.scores_per_group = 1 << 28      # float32 attention scores at a time (1 GiB)
        self._fns: dict = {}
        self._weights: dict = {}

    @classmethod
    def make(cls, compile: bool, fast_convs: bool | None = None) -> "FusedOps":
        """The decoder's glue; ``fast_convs`` (default: with ``compile``, i.e. on CUDA) adds the tap-sum head."""
        return cls(compile=compile, tap_head=compile if fast_convs is None else fast_convs)

    def _get(self, fn, key):
        if not self.compiled:
            return fn
        f = self._fns.get(key)
        if f is None:
            clone = type(fn)(fn.__code__.replace(), fn.__globals__, fn.__name__)
            f = self._fns[key] = torch.compile(clone, dynamic=False, fullgraph=True, mode=self.mode)
        return f

    def window(self, hist, x, gamma, bias):
        """[hist | silu(rms_norm(x + bias))] along time; ``hist`` rolls to its last frames (by a device copy: the
        same copy inside the compiled function became a kernel of its own, no faster: 573.6 vs 573.3 / 576.9 ms per
        W2 decode, H100, 2026-12-06)."""
        fn = _window_compiled if self.compiled else _window_eager
        xin = self._get(fn, ("window", x.shape, x.stride(), x.dtype, bias is None))(hist, x, gamma, bias)
        hist.copy_(xin[:, :, -HISTORY:])
        return xin

    def residual(self, y, bias, h) -> "torch.Tensor | PendingSum":
        """A residual block's output: with ``fold_residuals`` a ``PendingSum`` the next norm window adds (``dense``
        writes it for any other consumer), else the sum."""
        if self.fold_residuals:
            return PendingSum(y, bias, h)
        return self.dense(PendingSum(y, bias, h))

    def dense(self, x: "torch.Tensor | PendingSum") -> torch.Tensor:
        """``x`` as a tensor: a ``PendingSum`` written out (one pointwise pass)."""
        if not isinstance(x, PendingSum):
            return x
        y, bias, h = x
        if bias is None and not self.compiled:
            return y.add_(h)
        return self._get(_residual, ("residual", y.shape, y.stride(), h.stride(), y.dtype, bias is None))(y, bias, h)

    def residual_window(self, hist, pending: PendingSum, gamma):
        """The window of ``window`` over a ``PendingSum`` and the sum written, from one read of its parts:
        (window, sum); ``hist`` rolls."""
        y, bias, h = pending
        if not self.compiled:
            x = self.dense(pending)
            return self.window(hist, x, gamma, None), x
        key = ("res_window", y.shape, y.stride(), h.stride(), y.dtype, bias is None)
        xin, x = self._get(_residual_window, key)(hist, y, bias, h, gamma)
        hist.copy_(xin[:, :, -HISTORY:])
        return xin, x

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Single-head attention [n, 1, L, d]. SDPA, except for head dims of ``matmul_attention_min_dim`` and up
        (the VAE's 384: past the 256 that flash / cuDNN take, SDPA fell to its memory-efficient kernel, 10 ms of
        a W2 decode on an H100): two GEMMs with float32 scores and one softmax pass, a few frames at a time."""
        d = q.shape[-1]
        if d < self.matmul_attention_min_dim or (q.is_cuda and not _BMM_OUT_DTYPE):
            return F.scaled_dot_product_attention(q, k, v)
        n, _, L, _ = q.shape
        q3, k3, v3 = (t.reshape(n, L, d) for t in (q, k, v))
        out = torch.empty_like(q3)
        group = max(1, self.scores_per_group // (L * L))
        for a in range(0, n, group):
            s = _scores(q3[a:a + group], k3[a:a + group])
            p = self._get(_scaled_softmax, ("softmax", s.shape, q.dtype))(s, d ** -0.5, q.dtype)
            torch.bmm(p, v3[a:a + group], out=out[a:a + group])
        return out.view(n, 1, L, d)

    def norm_conv(self, conv: nn.Conv3d, hist: torch.Tensor, x: "torch.Tensor | PendingSum", gamma: torch.Tensor,
                  bias: torch.Tensor | None, keep_input: bool = False):
        """conv([hist | silu(rms_norm(x + bias))]) -> (output, bias still to add); ``hist`` rolls in place.
        ``x`` may be a ``PendingSum`` (then ``bias`` is None); ``keep_input`` also returns x written as a tensor
        (a block's shortcut reads it): (output, bias, x)."""
        if isinstance(x, PendingSum):
            xin, x = self.residual_window(hist, x, gamma)
        else:
            xin = self.window(hist, x, gamma, bias)
        out = self._conv_window(conv, xin)
        return out + (x,) if keep_input else out

    def _conv_window(self, conv, xin):
        if self.tap_head and conv.out_channels < 16:
            p = _tap_products(self.derived(conv, _tap_weights), xin)
            key = ("taps", p.shape, p.stride(), p.dtype, conv.bias is None)
            frames = xin.shape[2] - HISTORY
            return self._get(_tap_sum, key)(p, conv.bias, conv.out_channels, frames, conv.padding[1],
                                            conv.padding[2], xin.dtype), None
        return self.conv(conv, xin)

    def upsample(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """``conv(nearest_x2(x))`` per frame of [B,C,T,H,W] as one sub-pixel conv on the low-res input (no bias),
        then the phases interleaved with the bias added in one pointwise pass (instead of four strided copies
        and cuDNN's separate bias add)."""
        w4, bias = self.derived(conv, _subpixel_3d)
        y = F.conv3d(x, w4, None, padding=(0, 1, 1))                     # [b, 4co, t, h+1, w+1]
        key = ("phases", y.shape, y.stride(), y.dtype, bias is None)
        return self._get(_phases_to_pixels, key)(y, bias, w4.shape[0] // 4, *x.shape[-2:])

    def time_frames(self, conv: nn.Conv3d, x: torch.Tensor, cache: "ConvCache") -> torch.Tensor:
        """The temporal upsample: conv over [history | x] (no bias), then its 2c channels as 2t frames with the
        bias added, in one pointwise pass."""
        y = F.conv3d(cache.extend(x, conv.history), conv.weight, None, conv.stride, conv.padding)
        key = ("frames", y.shape, y.stride(), y.dtype, conv.bias is None)
        return self._get(_frames_from_channels, key)(y, conv.bias)

    def derived(self, conv: nn.Module, build):
        """``build(conv)``: weights a reformulation computes from conv's, kept until that weight changes (load,
        dtype cast)."""
        w = conv.weight
        key, stamp = (build, id(conv)), (w.data_ptr(), w.dtype, w._version)
        hit = self._weights.get(key)
        if hit is None or hit[0] != stamp:
            hit = self._weights[key] = (stamp, build(conv))
        return hit[1]

    def conv(self, conv: nn.Conv3d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conv3d on an already padded-in-time input; returns (output, bias still to add)."""
        if self.compiled:
            return F.conv3d(x, conv.weight, None, conv.stride, conv.padding), conv.bias
        return F.conv3d(x, conv.weight, conv.bias, conv.stride, conv.padding), None


class CausalConv3d(nn.Conv3d):
    """Conv3d causal in time: left temporal context comes from the cache (zeros at start).

    Spatial padding is done by the conv itself (no extra F.pad copy); only
    ``2 * padding[0]`` frames of history are concatenated in front.
    """

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        k = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(cin, cout, k, stride=stride, padding=(0, p[1], p[2]))
        self.history = 2 * p[0]

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        if self.history:
            if cache is None:
                x = F.pad(x, (0, 0, 0, 0, self.history, 0))
            else:
                x = cache.extend(x, self.history)
        return super().forward(x)


class RMS_norm(nn.Module):  # noqa: N801 - upstream class name kept for key parity
    """L2-normalise over channels times sqrt(C) and a learned gain (no bias in Wan)."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / ||x||_2 * sqrt(C) == x * rsqrt(mean(x^2)): one fused rms_norm over the channel axis
        # (contiguous in channels-last memory) instead of norm, divide, scale and gain passes.
        # eps ~ F.normalize's 1e-12 floor on the norm, moved onto the mean square.
        c = x.shape[1]
        y = F.rms_norm(x.movedim(1, -1), (c,), self.gamma.view(-1).to(x.dtype), eps=1e-24 / c)
        return y.movedim(-1, 1)


def _conv2d_per_frame(conv: nn.Conv2d, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Apply a Conv2d to every frame of [B,C,T,H,W] as a (1,k,k) Conv3d: no (b t) reshuffle."""
    pad = conv.padding[0]
    return F.conv3d(x, conv.weight.unsqueeze(2), conv.bias, stride=(1, stride, stride),
                    padding=(0, pad, pad))


class ResidualBlock(nn.Module):
    """norm-SiLU-conv-norm-SiLU-conv plus a 1x1x1 shortcut when channels change."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Sequential indices (0 norm, 2 conv, 3 norm, 6 conv) are the checkpoint's.
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        r = self.residual
        if cache is not None and cache.fused is not None:   # x may be the previous block's PendingSum
            y, bias, x = cache.norm_conv(r[2], x, r[0].gamma, None, keep_input=True)
            h = self.shortcut(x)
            y, bias = cache.norm_conv(r[6], y, r[3].gamma, bias)
            return cache.fused.residual(y, bias, h)
        h = self.shortcut(x)
        x = r[2](F.silu(r[0](x), inplace=True), cache)
        x = r[6](F.silu(r[3](x), inplace=True), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no temporal mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: ConvCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        qkv = _conv2d_per_frame(self.to_qkv, self.norm(x))            # [b, 3c, t, h, w]
        qkv = qkv.permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, 3 * c)
        q, k, v = qkv.chunk(3, dim=-1)
        if cache is not None and cache.fused is not None:
            y = cache.fused.attention(q, k, v)                          # [bt, 1, hw, c]
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        y = y.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        return _conv2d_per_frame(self.proj, y) + x


class Resample(nn.Module):
    """Spatial x2 up/down sampling, plus the temporal x2 step for the '3d' modes.

    upsample3d: a (3,1,1) causal conv doubles the channels, which are interleaved into
    two frames per input frame (time_conv before the spatial step). downsample3d: a
    stride-2 (3,1,1) conv over [previous frame, chunk] after the spatial step. On the
    first chunk of a stream both pass frame 0 through unchanged (upstream semantics),
    unless the cache was handed in already warm (``first=False``: the demo's zeros).
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        assert mode in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"), mode
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)),
                                          nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def _time_up(self, x: torch.Tensor, cache: ConvCache) -> torch.Tensor:
        head = None
        if cache.first:
            head, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2] == 0:  # first chunk of one frame: history stays zero
            cache.slot(head, HISTORY)
            return head
        b, c, t, h, w = x.shape
        if cache.fused is not None:  # conv, bias and interleave in x's memory format (reshape would not keep it)
            y = cache.fused.time_frames(self.time_conv, x, cache)
        else:
            y = self.time_conv(x, cache)
            y = y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        return y if head is None else torch.cat([head, y], dim=2)

    def _time_down(self, x: torch.Tensor, cache: ConvCache) -> torch.Tensor:
        hist = cache.slot(x, 1)
        head = None
        if cache.first:
            head, x = x[:, :, :1], x[:, :, 1:]
            hist.copy_(head)
        if x.shape[2] == 0:
            return head
        xin = torch.cat([hist, x], dim=2)
        hist.copy_(x[:, :, -1:])
        y = self.time_conv(xin)
        return y if head is None else torch.cat([head, y], dim=2)

    def forward(self, x: torch.Tensor, cache: ConvCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_up(x, cache)
        conv = self.resample[1]
        if self.mode.startswith("upsample") and cache.fused is not None:
            x = cache.fused.upsample(conv, x)
        elif self.mode.startswith("upsample"):
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
            x = _conv2d_per_frame(conv, x)
        else:
            x = _conv2d_per_frame(conv, F.pad(x, (0, 1, 0, 1)), stride=2)
        if self.mode == "downsample3d":
            x = self._time_down(x, cache)
        return x


def _run(layers, x: "torch.Tensor | PendingSum", cache: ConvCache) -> "torch.Tensor | PendingSum":
    """The layers in order; a residual block's ``PendingSum`` goes on only into another residual block (whose norm
    window adds it), and is written out for any other layer."""
    for layer in layers:
        if isinstance(x, PendingSum) and not isinstance(layer, ResidualBlock):
            x = cache.fused.dense(x)
        x = layer(x, cache)
    return x


class Encoder3d(nn.Module):
    """Video -> 2*z_dim moments at 1/8 resolution and 1/4 frame rate (+1)."""

    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int,
                 attn_scales, temperal_downsample):
        super().__init__()
        dims = [dim * u for u in [1] + list(dim_mult)]
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                if scale in attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if temperal_downsample[i]
                                       else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*blocks)
        self.middle = nn.Sequential(ResidualBlock(out_dim, out_dim), AttentionBlock(out_dim),
                                    ResidualBlock(out_dim, out_dim))
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(),
                                  CausalConv3d(out_dim, z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: ConvCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _run(self.middle, _run(self.downsamples, x, cache), cache)
        return self.head[2](F.silu(self.head[0](x)), cache)


class Decoder3d(nn.Module):
    """z_dim latent -> RGB at 8x resolution, 4x frame rate (frame 0 -> 1 frame)."""

    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int,
                 attn_scales, temperal_upsample):
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1]] + list(dim_mult)[::-1]]
        scale = 1.0 / 2 ** (len(dim_mult) - 2)
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:  # the previous Resample halved the channels
                in_dim //= 2
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                if scale in attn_scales:
                    blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temperal_upsample[i]
                                       else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(),
                                  CausalConv3d(out_dim, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: ConvCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _run(self.upsamples, _run(self.middle, x, cache), cache)
        if cache.fused is not None:
            y, bias = cache.norm_conv(self.head[2], x, self.head[0].gamma, None)
            return y if bias is None else y + bias.view(1, -1, 1, 1, 1)
        return self.head[2](F.silu(self.head[0](x)), cache)
