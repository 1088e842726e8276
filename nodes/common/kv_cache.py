"""The static [sink | ring] self-attention KV cache of causal (block-autoregressive) DiTs.

SelfKVCache holds every layer's self-attention K/V in one preallocated buffer
per tensor, rows laid out [sink | ring]: frames < sink_frames live at their own
slot forever; later frames go round a ring of window_frames - sink_frames slots.
Where a block's rows go is a pure function of (frame_start, num_frames), so the
cache carries no mutable indices: no .item(), no host sync, a static attended
length per block (CUDA-graph buckets by it), and a new rollout simply starts at
frame 0 again. Keys are stored after RoPE.

Upstream (Self-Forcing CausalWanSelfAttention) appends and, when a block does
not fit, rolls the non-sink part left to evict the oldest frames. The ring keeps
the same SET of frames (the sink, then the newest window_frames - sink_frames
frames), only in another row order; attention is permutation-invariant over
post-RoPE keys, so results agree without the roll copy. `chronological` returns
upstream's row order.

For CUDA graphs the per-block variation travels as tensors (``DeviceRows``): the
block's cache rows as an index (``index_copy_``) and, in 'relative' mode, the sink
shift's rotation. A captured call then depends on the attended length only, so
once the window is full one graph serves every later block.

FP8 (``dtype=torch.float8_e4m3fn``): K and V are stored in e4m3 with one float32 scale per (token,
head) (amax over the head dim / 448: 4 bytes per 128 values, so the cache takes 0.53x of bf16), written
by the same index path, and ``keys_values`` returns the attended rows dequantised to ``read_dtype``.
Per-token scales are what an incrementally written cache can have without rescaling old rows; FP8
attention, whose descales are scalars, takes the rows through ``quantized_values`` and rescales them by
s_row / max(s) (nodes/common/fp8_attention.py ``requantize_qkv``), never through bf16.

``fp8_scaling="tensor"`` stores each layer's K and V at ONE running scale instead (the max amax / 448 seen
so far this session): what FP8 attention with tensor scales reads as is, so a denoising step no longer
rescales the whole window (2 x 50 MB per layer at W1's steady shapes). A write that raises the scale
shrinks the stored rows once (``fp8_kernels.rescale_fp8_``: a no-op launch when the scale did not grow).
The price: a layer's scale only grows within a session, so one loud block coarsens the rounding of the
later ones (per-tensor scaling of a window has the same exposure while that block is in it).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .fp8 import E4M3, amax_scale, dequantize, quantize, quantize_rows
from .fp8_kernels import rescale_fp8_
from .rope import apply_rope, frame_shift_cos_sin

ROPE_MODES = ("absolute", "relative")
FP8_SCALINGS = ("row", "tensor")   # an FP8 cache's scales: per (token, head), or one running scale per layer


def quantize_running(x: torch.Tensor, scale: torch.Tensor) -> tuple:
    """x at a running scale: s = max(scale, amax(x) / 448); returns (x8, s, scale / s), the last being the
    factor the rows already stored at ``scale`` must be multiplied by (1 when the scale did not grow)."""
    s = torch.maximum(scale, amax_scale(x))
    return quantize(x, s), s, scale / s


@dataclass(frozen=True)
class BlockPlan:
    """Where one block of frames goes in a SelfKVCache; Python ints only."""
    frame_start: int
    num_frames: int
    writes: tuple[tuple[int, int, int], ...]  # (cache row, row within the block, rows)
    attend_rows: int                          # keys attended = cache rows [0, attend_rows)
    sink_shift: int                           # 'relative' mode: frames the sink keys move forward


@dataclass
class DeviceRows:
    """Device-side data of a BlockPlan: what a captured call takes as copied-in inputs."""
    index: torch.Tensor                 # [num_frames * frame_tokens] int64: cache row of each block token
    shift_cos: torch.Tensor | None = None  # 'relative' mode with sink: [1, 1, D/2] rotation of the sink keys
    shift_sin: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.index,) if self.shift_cos is None else (self.index, self.shift_cos, self.shift_sin)

    @classmethod
    def from_tensors(cls, tensors) -> "DeviceRows":
        return cls(*tensors)


class SelfKVCache:
    """Self-attention K/V of all layers for one rollout.

    window_frames counts ALL cached frames, sink included (upstream's
    local_attn_size); None keeps every frame of the rollout, which then needs
    max_frames. rope_mode:
      'absolute' (upstream): queries and keys rotate at their absolute frame index.
      'relative': as 'absolute', except that once frames are evicted the sink keys
        are moved forward in time by the number of evicted frames, i.e. the window
        is positioned as if sink and retained frames were contiguous. Query-to-
        window distances are unchanged (RoPE depends on differences only) and the
        query-to-sink distance stays bounded in unbounded rollouts. Without sink
        frames it equals 'absolute'. A float32 copy of the unshifted sink keys is
        kept so repeated shifts never accumulate rounding.
    ``read_dtype``: what ``keys_values`` returns for an FP8 cache (default: float32); ignored otherwise.
    ``fp8_scaling``: an FP8 cache's scales, FP8_SCALINGS (see the module docstring).
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, frame_tokens: int, *,
                 sink_frames: int = 0, window_frames: int | None = None, max_frames: int | None = None,
                 batch_size: int = 1, rope_mode: str = "absolute",
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 read_dtype: torch.dtype | None = None, fp8_scaling: str = "row"):
        if fp8_scaling not in FP8_SCALINGS:
            raise ValueError(f"fp8_scaling must be one of {FP8_SCALINGS}, got {fp8_scaling!r}")
        if rope_mode not in ROPE_MODES:
            raise ValueError(f"rope_mode must be one of {ROPE_MODES}, got {rope_mode!r}")
        if window_frames is None:
            if max_frames is None:
                raise ValueError("window_frames=None (keep all frames) needs max_frames")
            window_frames, self.bounded = max_frames, True
        else:
            self.bounded = False
        if window_frames - sink_frames < 1:
            raise ValueError(f"window_frames ({window_frames}) must exceed sink_frames ({sink_frames})")
        self.num_layers, self.head_dim, self.frame_tokens = num_layers, head_dim, frame_tokens
        self.sink_frames, self.window_frames = sink_frames, window_frames
        self.ring_frames = window_frames - sink_frames
        self.rope_mode = rope_mode
        shape = (num_layers, batch_size, window_frames * frame_tokens, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.fp8 = dtype == E4M3
        self.read_dtype = (read_dtype or torch.float32) if self.fp8 else dtype
        self.k_scale = self.v_scale = None
        self.tensor_scaled = self.fp8 and fp8_scaling == "tensor"
        # FP8 (de)quantisers; the model may swap in compiled ones (one fused pass each instead of three)
        self.quant, self.dequant, self.quant_running = quantize_rows, dequantize, quantize_running
        if self.fp8:
            scale_shape = (num_layers, 1, 1, 1, 1) if self.tensor_scaled else shape[:-1] + (1,)
            self.k_scale = torch.zeros(scale_shape, dtype=torch.float32, device=device)
            self.v_scale = torch.zeros(scale_shape, dtype=torch.float32, device=device)
        self.sink_k = None
        self._rows: OrderedDict[tuple, DeviceRows] = OrderedDict()
        if rope_mode == "relative" and sink_frames:
            self.sink_k = torch.zeros(shape[:2] + (sink_frames * frame_tokens,) + shape[3:],
                                      dtype=torch.float32, device=device)

    def _slot(self, frame: int) -> int:
        s = self.sink_frames
        return frame if frame < s else s + (frame - s) % self.ring_frames

    def plan(self, frame_start: int, num_frames: int) -> BlockPlan:
        end, s, ft = frame_start + num_frames, self.sink_frames, self.frame_tokens
        if self.bounded and end > self.window_frames:
            raise ValueError(f"frame {end - 1} is beyond the cache's {self.window_frames} frames")
        in_ring = end - max(s, frame_start)
        if in_ring > self.ring_frames:
            raise ValueError(f"a block of {num_frames} frames does not fit the {self.ring_frames}-frame "
                             f"window after {s} sink frames (upstream fails here too)")
        writes: list[list[int]] = []
        for i in range(num_frames):
            f = frame_start + i
            dst = self._slot(f) * ft
            last = writes[-1] if writes else None
            if last and last[0] + last[2] == dst and (dst >= s * ft) == (last[0] >= s * ft):
                last[2] += ft
            else:
                writes.append([dst, i * ft, ft])
        return BlockPlan(frame_start, num_frames, tuple(tuple(w) for w in writes),
                         min(end, self.window_frames) * ft, max(0, end - self.ring_frames - s))

    def device_rows(self, plan: BlockPlan) -> DeviceRows:
        """The plan's row index (and sink shift rotation) on the cache's device, memoised: the
        ring makes them periodic, so a handful of entries serve an unbounded rollout."""
        key = (plan.writes, plan.sink_shift if self.sink_k is not None else None)
        rows = self._rows.get(key)
        if rows is None:
            dev = self.k.device
            index = torch.cat([torch.arange(dst, dst + n, device=dev) for dst, _, n in plan.writes])
            shift = (None, None)
            if self.sink_k is not None:
                shift = frame_shift_cos_sin(self.head_dim, plan.sink_shift, dev)
            rows = self._rows[key] = DeviceRows(index, *shift)
            while len(self._rows) > 64:
                self._rows.popitem(last=False)
        return rows

    def sink_writes(self, plan: BlockPlan) -> tuple[tuple[int, int, int], ...]:
        """The plan's writes that land in the sink ('relative' mode keeps a float32 copy of those)."""
        if self.sink_k is None:
            return ()
        return tuple(w for w in plan.writes if w[0] < self.sink_k.shape[2])

    def write(self, layer: int, plan: BlockPlan, k: torch.Tensor, v: torch.Tensor,
              rows: DeviceRows | None = None) -> None:
        """Store the block's post-RoPE k and its v ([B, rows, H, D]) at the plan's rows
        (through ``rows.index`` when given: one launch per tensor, capture-friendly)."""
        if self.tensor_scaled:
            pairs = ((self.k, self._at_running_scale(layer, self.k, self.k_scale, k)),
                     (self.v, self._at_running_scale(layer, self.v, self.v_scale, v)))
        elif self.fp8:
            (k8, ks), (v8, vs) = self.quant(k), self.quant(v)
            pairs = ((self.k, k8), (self.v, v8), (self.k_scale, ks), (self.v_scale, vs))
        else:
            pairs = ((self.k, k), (self.v, v))
        if rows is None:
            for dst, src, n in plan.writes:
                for buf, x in pairs:
                    buf[layer, :, dst:dst + n] = x[:, src:src + n]
        else:
            for buf, x in pairs:
                _index_copy(buf[layer], rows.index, x.to(buf.dtype))
        for dst, src, n in self.sink_writes(plan):
            self.sink_k[layer, :, dst:dst + n] = k[:, src:src + n]

    def _at_running_scale(self, layer: int, buf: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x in e4m3 at the layer's running scale; the layer's stored rows shrink first if the scale grows."""
        x8, s, ratio = self.quant_running(x, scale[layer])
        rescale_fp8_(buf[layer], ratio)
        scale[layer].copy_(s)
        return x8

    def keys_values(self, layer: int, plan: BlockPlan,
                    rows: DeviceRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The attended K/V (views into the cache, ring order; an FP8 cache returns dequantised copies)
        for a block already written."""
        self._shift_sink(layer, plan, rows)
        n = plan.attend_rows
        if self.fp8:
            return (self.dequant(self.k[layer, :, :n], self._scales(self.k_scale, layer, n), self.read_dtype),
                    self.dequant(self.v[layer, :, :n], self._scales(self.v_scale, layer, n), self.read_dtype))
        return self.k[layer, :, :n], self.v[layer, :, :n]

    def quantized_values(self, layer: int, plan: BlockPlan, rows: DeviceRows | None = None) -> tuple:
        """An FP8 cache's attended rows as stored: (k8, k_scale, v8, v_scale), views (FP8 attention reads these).
        The scales are [B, rows, H, 1], or [1, 1, 1, 1] for a tensor-scaled cache."""
        if not self.fp8:
            raise ValueError("quantized_values needs an FP8 cache")
        self._shift_sink(layer, plan, rows)
        n = plan.attend_rows
        return (self.k[layer, :, :n], self._scales(self.k_scale, layer, n),
                self.v[layer, :, :n], self._scales(self.v_scale, layer, n))

    def _scales(self, scale: torch.Tensor, layer: int, n: int) -> torch.Tensor:
        return scale[layer] if self.tensor_scaled else scale[layer, :, :n]

    def _shift_sink(self, layer: int, plan: BlockPlan, rows: DeviceRows | None) -> None:
        """'relative' mode: rewrite the sink keys from their float32 copy, moved forward by the plan's shift."""
        if self.sink_k is None:
            return
        if rows is None:
            cos, sin = frame_shift_cos_sin(self.head_dim, plan.sink_shift, self.k.device)
        else:
            cos, sin = rows.shift_cos, rows.shift_sin
        n = self.sink_k.shape[2]
        shifted = apply_rope(self.sink_k[layer], cos, sin)
        if self.tensor_scaled:
            self.k[layer, :, :n] = self._at_running_scale(layer, self.k, self.k_scale, shifted)
        elif self.fp8:
            self.k[layer, :, :n], self.k_scale[layer, :, :n] = self.quant(shifted)
        else:
            self.k[layer, :, :n] = shifted.to(self.k.dtype)

    def chronological(self, layer: int, frame_end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached K/V after frames [0, frame_end) in upstream's row order (for tests/debugging)."""
        s, ft = self.sink_frames, self.frame_tokens
        frames = list(range(min(s, frame_end))) + list(range(max(s, frame_end - self.ring_frames), frame_end))
        idx = torch.tensor([self._slot(f) * ft + j for f in frames for j in range(ft)], device=self.k.device)
        if self.fp8:
            return tuple(dequantize(x[layer].index_select(1, idx),
                                    s[layer] if self.tensor_scaled else s[layer].index_select(1, idx), self.read_dtype)
                         for x, s in ((self.k, self.k_scale), (self.v, self.v_scale)))
        return self.k[layer].index_select(1, idx), self.v[layer].index_select(1, idx)

    def buffers(self) -> dict[str, torch.Tensor]:
        """Every tensor the cache keeps between blocks, by name (snapshots, clearing)."""
        named = (("k", self.k), ("v", self.v), ("sink_k", self.sink_k), ("k_scale", self.k_scale),
                 ("v_scale", self.v_scale))
        return {name: t for name, t in named if t is not None}


def _index_copy(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """dst.index_copy_(1, index, src), through a byte view for float8 (index_copy has no float8 kernel)."""
    if dst.dtype == E4M3:
        dst, src = dst.view(torch.uint8), src.view(torch.uint8)
    dst.index_copy_(1, index, src)
