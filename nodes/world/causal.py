"""The world DiT behind the causal-model contract: Wan's stream, with ``action`` as its block condition.

Everything but the condition's name and shape is ``nodes.wan.causal``: the same KV cache, the same
``CausalDenoiser`` (CUDA graphs on CUDA), the same snapshot state. ``ar.sampler`` hands each block
its action ids [B, f]; the stream spreads each frame's id over the frame's patch grid and passes
it down the camera path (``ActionWanDiT.embed_camera``).
"""
from __future__ import annotations

import torch

from nodes.common.causal import StreamSpec
from nodes.wan.causal import WanCausalStream, WanDenoiser


class WorldDenoiser(WanDenoiser):
    """A ``WanDenoiser`` over an ``ActionWanDiT``: session condition ``text`` (the learned world context),
    block condition ``action`` (ids [B, f], one per latent frame)."""

    session_conditions = ("text",)

    @property
    def block_conditions(self) -> tuple[str, ...]:
        return ("action",)

    def open_stream(self, spec: StreamSpec) -> "WorldStream":
        return WorldStream(self, spec)


class WorldStream(WanCausalStream):
    def _tokens(self, action: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if action is None:
            raise ValueError("the world model needs an `action` condition for every block (wire ar.sampler's "
                             "`action` input, e.g. from a world.actions node)")
        b, f = x.shape[:2]
        action = torch.as_tensor(action, device=x.device).long()
        if action.dim() == 1:
            action = action.unsqueeze(0)
        if action.shape[-1] != f:
            raise ValueError(f"the block has {f} frames but {action.shape[-1]} actions")
        ph, pw = self.model.patch_grid()
        return action.expand(b, f)[:, :, None, None].expand(b, f, x.shape[3] // ph, x.shape[4] // pw)

    def denoise(self, x, t, frame_start, action=None):
        return super().denoise(x, t, frame_start, camera=self._tokens(action, x))

    def prepare(self, x, first_frame: int = 0, action=None) -> int:
        ids = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device) if action is None else action
        return super().prepare(x, first_frame, camera=self._tokens(ids, x))
