"""FlashVSR's streaming settings: what the spec chooses (the DiT's sizes come from its weights).

Upstream's constants, kept here with their reasons:
- the first DiT call takes 6 latent frames (LQ frames 0..24: 1 priming frame + 6 x 4), every later
  call 2 (8 LQ frames); latent frame j of call i >= 1 is absolute frame 4 + 2i + j, which is also its
  RoPE time position;
- the self-attention cache keeps post-RoPE key/value windows of previous temporal blocks (2 latent
  frames each): after a call, if it holds more than kv_len = int(kv_ratio) temporal blocks, the oldest
  ONE is dropped (one per call, as upstream);
- sparse budget per (head, query temporal block): int(windows^2 * topk_ratio) - 1 blocks, where the real
  pipeline sets topk_ratio = sparse_ratio * 768 * 1280 / (H_px * W_px) (the budget is tuned at 768x1280).
"""
from __future__ import annotations

from dataclasses import dataclass

FIRST_CALL_FRAMES = 6
CALL_FRAMES = 2
FIRST_CALL_LQ_FRAMES = 1 + 4 * FIRST_CALL_FRAMES   # 25
CALL_LQ_FRAMES = 4 * CALL_FRAMES                   # 8
REFERENCE_PIXELS = 768 * 1280
ATTENTION_MODES = ("sparse", "dense")


def call_frame_start(call: int) -> int:
    """Absolute latent frame (and RoPE time position) of call ``call``'s first frame."""
    return 0 if call == 0 else FIRST_CALL_FRAMES - CALL_FRAMES + CALL_FRAMES * call


@dataclass(frozen=True)
class StreamSettings:
    attention: str = "sparse"           # sparse (upstream) or dense full attention over cache + chunk
    kernel: str = "auto"                # sparse path: auto (Triton on CUDA, masked elsewhere), triton, masked
    sparse_ratio: float = 2.0           # upstream: 2.0 stable, 1.5 faster
    topk_ratio: float | None = None     # explicit budget ratio (overrides sparse_ratio's size rule)
    local_range: int = 11               # upstream: 11 stable, 9 sharper
    kv_ratio: float = 3.0               # temporal blocks of cache kept: int(kv_ratio)
    lq_mode: str = "causal"             # LQ projector cache: causal (v1.1) or buffer (v1)

    def __post_init__(self):
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if self.local_range < 1:
            raise ValueError(f"local_range must be >= 1, got {self.local_range}")
        if int(self.kv_ratio) < 1:
            raise ValueError(f"kv_ratio must be >= 1 (int(kv_ratio) temporal blocks are kept), got {self.kv_ratio}")

    @property
    def kv_len(self) -> int:
        return int(self.kv_ratio)

    def ratio_for(self, height_px: int, width_px: int) -> float:
        """topk_ratio at this output size (upstream's rule unless given explicitly)."""
        if self.topk_ratio is not None:
            return float(self.topk_ratio)
        return self.sparse_ratio * REFERENCE_PIXELS / (height_px * width_px)
