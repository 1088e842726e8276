"""LingBot-World nodes: `lingbot.camera` (the per-block Plücker camera condition) and `tensor.block_frames`
(a session tensor's frames of the current block, e.g. the I2V ``y``).

`lingbot.camera` streams: block b's condition is computed from that block's own poses (one per latent
frame: pixel pose 4i for latent frame i), the last pose of the block before (the framewise reference)
and one translation scale fixed at the start of the session (the largest framewise translation of the
whole path, as upstream normalises; ``translation_scale`` sets it for open-ended paths). For a path of
4k+1 poses whose latent count is a multiple of the block size this equals upstream's whole-clip tensor;
where upstream truncates the latent count it resamples the path (slerp) instead, which a stream cannot.
With the ``control`` input wired (fd serve's WASD + mouse vector) each block's poses continue the last
pose at the controlled rate instead, so the world responds from the next block on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.errors import FdError
from engine.node import BLOCK, Param, Port
from engine.node import Node
from engine.types import CAMERA, LATENT, LIST, TENSOR

from .plucker import block_rays, described_path, framewise_relative, translation_scale

DEFAULT_K = (480.0, 480.0, 416.0, 240.0)   # fx, fy, cx, cy at 480x832 (a 60-degree-ish lens) for described paths


def _load(path: str, name: str) -> torch.Tensor:
    p = Path(path)
    if not p.exists():
        raise FdError(f"{name}: file not found: {path}")
    try:
        return torch.from_numpy(np.load(p)).float()
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error naming the input
        raise FdError(f"{name}: cannot read {path}: {e}") from None


class LingBotCameraNode(Node):
    type_name = "lingbot.camera"
    doc = ("LingBot-World camera condition: camera-to-world poses (one per pixel frame) and intrinsics (fx, fy, cx, cy "
           "at 480x832) to the Plücker ray tensor [1, 384, f, h, w] of each block, from that block's poses only.")
    inputs = (
        Port("poses", TENSOR, "camera-to-world poses [N, 4, 4] (overrides the poses/path params)", optional=True),
        Port("intrinsics", TENSOR, "[N, 4] fx, fy, cx, cy at 480x832 (row 0 is used)", optional=True),
        Port("control", LIST, "live control [forward, right, yaw, pitch] in [-1, 1] (fd serve: WASD + mouse): this "
             "block's poses continue the last one at that rate (speed, turn); replaces the path", optional=True),
    )
    outputs = (Port("camera", CAMERA, "this block's Plücker tensor [1, 384, frames_per_block, h, w]"),)
    params = (
        Param("poses", str, None, "poses.npy [N, 4, 4] camera-to-world", nullable=True),
        Param("intrinsics", str, None, "intrinsics.npy [N, 4] (fx, fy, cx, cy at 480x832)", nullable=True),
        Param("path", dict, None, "a described path instead of files: {frames, forward (m), yaw (deg, left), right, "
              "up, pitch}", nullable=True),
        Param("frames_per_block", int, 3, "latent frames per block", min=1),
        Param("latent_height", int, 60, "latent height", min=1),
        Param("latent_width", int, 104, "latent width", min=1),
        Param("translation_scale", float, None, "divide translations by this (null: the largest framewise "
              "translation of the whole path, as upstream; live control: speed)", min=0.0, nullable=True),
        Param("speed", float, 0.25, "live control: metres per latent frame at full forward / right", min=0.0),
        Param("turn", float, 5.0, "live control: degrees per latent frame at full yaw / pitch", min=0.0),
    )
    phase = BLOCK

    def new_state(self):
        return {"scale": None, "pose": None}

    def _path(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        poses, K = inputs.get("poses"), inputs.get("intrinsics")
        if poses is None:
            if self.p.poses is not None:
                poses = _load(self.p.poses, "poses")
            elif self.p.path is not None:
                d = dict(self.p.path)
                unknown = set(d) - {"frames", "forward", "yaw", "right", "up", "pitch"}
                if unknown or "frames" not in d:
                    raise FdError(f"node {self.name!r}: path needs `frames` and takes forward, yaw, right, up, pitch "
                                  f"(got {sorted(d)})")
                poses = described_path(int(d.pop("frames")), **{k: float(v) for k, v in d.items()})
            else:
                raise FdError(f"node {self.name!r}: no camera path: wire `poses` or set the poses or path param")
        if K is None:
            K = _load(self.p.intrinsics, "intrinsics") if self.p.intrinsics is not None else \
                torch.tensor([DEFAULT_K]).expand(len(poses), 4)
        poses, K = torch.as_tensor(poses).float().cpu(), torch.as_tensor(K).float().cpu()
        if poses.ndim != 3 or poses.shape[1:] != (4, 4):
            raise FdError(f"node {self.name!r}: poses must be [N, 4, 4] camera-to-world matrices, got {list(poses.shape)}")
        if K.ndim != 2 or K.shape[1] != 4 or len(K) == 0 or not torch.isfinite(K[0]).all() or (K[0, :2] == 0).any():
            raise FdError(f"node {self.name!r}: intrinsics must be [N, 4] with a finite first row (fx, fy != 0), "
                          f"got {list(K.shape)}")
        if not torch.isfinite(poses).all():
            raise FdError(f"node {self.name!r}: poses hold non-finite values")
        return poses, K

    def _live(self, control, state, b: int) -> torch.Tensor:
        """Block b's latent-rate poses from the live control, continuing the last pose (identity at the start)."""
        try:
            fwd, right, yaw, pitch = (max(-1.0, min(1.0, float(v))) for v in control)
        except (TypeError, ValueError):
            raise FdError(f"node {self.name!r}: control must be [forward, right, yaw, pitch], got {control!r}") from None
        # one latent frame of motion; the page's yaw is + to the right and its pitch + down, the path's the reverse
        move = described_path(2, forward=fwd * self.p.speed, right=right * self.p.speed, yaw=-yaw * self.p.turn,
                              pitch=-pitch * self.p.turn)[1].double()
        pose = torch.eye(4, dtype=torch.float64) if state["pose"] is None else state["pose"].double()
        out = []
        for i in range(self.p.frames_per_block):
            if b > 0 or i > 0:
                pose = pose @ move
            out.append(pose)
        return torch.stack(out)

    def run(self, inputs, state, step):
        if inputs.get("control") is not None:
            b = int(step.block or 0)
            K = inputs.get("intrinsics")
            if K is None:
                K = _load(self.p.intrinsics, "intrinsics") if self.p.intrinsics is not None else torch.tensor([DEFAULT_K])
            prev = state["pose"]
            poses = self._live(inputs["control"], state, b)
            state["pose"] = poses[-1].float()
            scale = self.p.translation_scale if self.p.translation_scale is not None else self.p.speed
            cam = block_rays(poses.float(), torch.as_tensor(K).float(), None, prev, scale,
                             latent=(self.p.latent_height, self.p.latent_width))
            return {"camera": cam.to(self.device)}
        poses, K = self._path(inputs)
        f, b = self.p.frames_per_block, int(step.block or 0)
        lat_idx = list(range(b * f, (b + 1) * f))
        need = 4 * lat_idx[-1]
        if need >= len(poses):
            raise FdError(f"node {self.name!r}: poses: block {b} needs pixel pose {need} (latent frames "
                          f"{lat_idx[0]}..{lat_idx[-1]}), the camera path has {len(poses)}: it is shorter than the rollout")
        if state["scale"] is None:
            if self.p.translation_scale is not None:
                state["scale"] = float(self.p.translation_scale)
            else:
                lat = poses[:(len(poses) - 1) // 4 * 4 + 1:4]
                state["scale"] = translation_scale(framewise_relative(lat.double()))
        prev = None if b == 0 else poses[4 * (lat_idx[0] - 1)]
        cam = block_rays(poses[[4 * i for i in lat_idx]], K, None, prev, state["scale"],
                         latent=(self.p.latent_height, self.p.latent_width))
        return {"camera": cam.to(self.device)}

    def state_tensors(self, state) -> dict:
        out = {} if state["scale"] is None else {"scale": float(state["scale"])}
        if state["pose"] is not None:
            out["pose"] = state["pose"]
        return out

    def load_state(self, state, values: dict):
        state["scale"] = values.get("scale")
        state["pose"] = None if values.get("pose") is None else values["pose"].detach().cpu().clone()
        return state


class BlockFramesNode(Node):
    type_name = "tensor.block_frames"
    doc = ("The current block's frames of a whole-clip tensor [B, F, ...] (e.g. Wan I2V's y for a per-block "
           "condition): frames [b*frames_per_block, (b+1)*frames_per_block); past the end, the last block again "
           "(past_end: repeat) or an error.")
    inputs = (Port("latent", LATENT, "whole-clip tensor [B, F, C, h, w]"),)
    outputs = (Port("latent", LATENT, "this block's frames [B, frames_per_block, C, h, w]"),)
    params = (
        Param("frames_per_block", int, 3, "frames per block", min=1),
        Param("past_end", str, "repeat", "blocks past the clip: repeat the last whole block, or error",
              choices=("repeat", "error")),
    )
    phase = BLOCK

    def run(self, inputs, state, step):
        x, f, b = inputs["latent"], self.p.frames_per_block, int(step.block or 0)
        total = x.shape[1] // f
        if total == 0:
            raise FdError(f"node {self.name!r}: latent has {x.shape[1]} frames, fewer than one block of {f}")
        if b >= total:
            if self.p.past_end == "error":
                raise FdError(f"node {self.name!r}: block {b} is past the {total} blocks of the clip")
            b = total - 1
        return {"latent": x[:, b * f:(b + 1) * f]}


NODE_TYPES = (LingBotCameraNode, BlockFramesNode)
