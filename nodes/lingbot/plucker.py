"""Camera path -> Plücker ray tensor, the camera condition of LingBot-World's Wan DiT.

Facts of the upstream recipe (robbyant/lingbot-world, wan/utils/cam_utils.py as WanI2VFast.generate
calls it), re-implemented here:

1. poses (camera-to-world 4x4, one per pixel frame) are trimmed to 4k+1 frames and to the requested
   frame count; the latent frame count (4k+1 -> k+1) is truncated down to a multiple of the chunk size;
2. the poses are resampled at ``linspace(0, len-1, latent_frames)`` (translation linear, rotation
   quaternion slerp), in float64, then cast to float32;
3. each latent frame's pose is made relative to the previous one ("framewise"; frame 0 = identity),
   computed as [A_R^T B_R | A_R^T (B_t - A_t)] so a pure rotation keeps exactly zero translation;
   the translations are divided by their largest norm when that is > 0;
4. the intrinsics (fx, fy, cx, cy at 480x832, first row only) are rescaled to the output size;
5. per pixel (centres at +0.5): d = normalise(((u-cx)/fx, (v-cy)/fy, 1)) rotated by R, o = t,
   6 channels (o, d); folded 8x8 space-to-depth to [1, 6*64, F, H/8, W/8], channel c*64 + row*8 + col.

Streaming: ``block_rays`` computes one block from that block's latent-rate poses, the previous
block's last pose (the framewise reference) and a translation scale; concatenated over blocks it is
``plucker_embedding`` of the whole path when the scale is the whole path's.
"""
from __future__ import annotations

import math

import numpy as np
import torch

REF_HW = (480, 832)   # the size the intrinsics are given at (upstream get_Ks_transformed's source size)
FOLD = 8              # space-to-depth factor (the VAE's spatial stride)


def latent_hw(image_hw, max_area: int, stride: int = 8, patch: int = 2) -> tuple[int, int]:
    """Wan I2V's latent size for an image of image_hw at max_area (area kept, multiple of patch)."""
    h, w = image_hw
    aspect = h / w
    lat_h = round(math.sqrt(max_area * aspect) // stride // patch * patch)
    lat_w = round(math.sqrt(max_area / aspect) // stride // patch * patch)
    return lat_h, lat_w


def frame_counts(n_poses: int, frame_num: int, chunk: int) -> tuple[int, int]:
    """(pixel frames used, latent frames) for n_poses poses and a requested frame_num."""
    len_c2ws = ((n_poses - 1) // 4) * 4 + 1
    used = min(((frame_num - 1) // 4) * 4 + 1, len_c2ws)
    lat_f = (used - 1) // 4 + 1
    return used, lat_f // chunk * chunk


def _mat_to_quat(r: np.ndarray) -> np.ndarray:
    """[N, 3, 3] rotations -> [N, 4] unit quaternions (x, y, z, w)."""
    out = np.empty((len(r), 4))
    for i, m in enumerate(r):
        tr = np.trace(m)
        cand = [tr, m[0, 0], m[1, 1], m[2, 2]]
        k = int(np.argmax(cand))
        if k == 0:
            s = math.sqrt(1.0 + tr) * 2
            q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, s / 4]
        else:
            a, b, c = k - 1, k % 3, (k + 1) % 3
            s = math.sqrt(1.0 + m[a, a] - m[b, b] - m[c, c]) * 2
            q = [0.0, 0.0, 0.0, (m[c, b] - m[b, c]) / s]
            q[a], q[b], q[c] = s / 4, (m[a, b] + m[b, a]) / s, (m[a, c] + m[c, a]) / s
        out[i] = q
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _quat_to_mat(q: np.ndarray) -> np.ndarray:
    x, y, z, w = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def resample_poses(c2ws: np.ndarray, n: int) -> np.ndarray:
    """[L, 4, 4] poses at frames 0..L-1 -> [n, 4, 4] at linspace(0, L-1, n) (float64)."""
    c2ws = np.asarray(c2ws, dtype=np.float64)
    L = len(c2ws)
    tgt = np.linspace(0, L - 1, n)
    q = _mat_to_quat(c2ws[:, :3, :3])
    for i in range(1, L):  # shortest arc between neighbours
        if np.dot(q[i - 1], q[i]) < 0:
            q[i] = -q[i]
    out = np.tile(np.eye(4), (n, 1, 1))
    for j, s in enumerate(tgt):
        i = min(int(math.floor(s)), L - 2) if L > 1 else 0
        a = s - i if L > 1 else 0.0
        if L == 1 or a == 0.0:
            out[j, :3, :3] = c2ws[i, :3, :3] if a == 0.0 else _quat_to_mat(q[i:i + 1])[0]
            out[j, :3, 3] = c2ws[i, :3, 3]
            continue
        q0, q1 = q[i], q[i + 1]
        dot = min(1.0, float(np.dot(q0, q1)))
        th = math.acos(dot)
        if th < 1e-12:
            qi = q0
        else:
            qi = (math.sin((1 - a) * th) * q0 + math.sin(a * th) * q1) / math.sin(th)
        out[j, :3, :3] = _quat_to_mat((qi / np.linalg.norm(qi))[None])[0]
        out[j, :3, 3] = (1 - a) * c2ws[i, :3, 3] + a * c2ws[i + 1, :3, 3]
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[..., 4, 4] x [..., 4, 4] -> inv(a) @ b as [a_R^T b_R | a_R^T (b_t - a_t)]."""
    ra = a[..., :3, :3].transpose(-1, -2)
    out = torch.zeros_like(b)
    out[..., :3, :3] = ra @ b[..., :3, :3]
    out[..., :3, 3] = (ra @ (b[..., :3, 3] - a[..., :3, 3]).unsqueeze(-1)).squeeze(-1)
    out[..., 3, 3] = 1
    return out


def framewise_relative(c2ws: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
    """[F, 4, 4] -> each pose relative to the one before it; the first relative to ``prev``
    (None: identity, the start of a path). Upstream first makes every pose relative to frame 0 and
    then takes neighbours; the same two steps are done here."""
    ref = c2ws[0] if prev is None else prev
    rel0 = _relative(ref.expand_as(c2ws), c2ws)
    out = torch.empty_like(c2ws)
    if prev is None:
        out[0] = torch.eye(4, dtype=c2ws.dtype)
    else:
        out[0] = rel0[0]
    out[1:] = _relative(rel0[:-1], rel0[1:])
    return out


def translation_scale(rel: torch.Tensor) -> float:
    """The largest translation norm of relative poses (0: none moves)."""
    return float(rel[:, :3, 3].norm(dim=-1).max())


def scaled_intrinsics(intrinsics: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[N, 4] (fx, fy, cx, cy) at 480x832 -> [4] of the first row at ``hw``."""
    k = intrinsics[0].float()
    h, w = hw
    sx, sy = w / REF_HW[1], h / REF_HW[0]
    return torch.stack([k[0] * sx, k[1] * sy, k[2] * sx, k[3] * sy])


def rays(rel: torch.Tensor, K: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """relative poses [F, 4, 4], intrinsics [4] -> per-pixel (o, d) [F, H, W, 6]."""
    h, w = hw
    fx, fy, cx, cy = K.to(rel.dtype)
    v, u = torch.meshgrid(torch.arange(h, dtype=rel.dtype) + 0.5, torch.arange(w, dtype=rel.dtype) + 0.5,
                          indexing="ij")
    d = torch.stack([(u - cx) / fx, (v - cy) / fy, torch.ones_like(u)], -1).reshape(-1, 3)
    d = d / d.norm(dim=-1, keepdim=True)
    d = torch.einsum("nk,fjk->fnj", d, rel[:, :3, :3])                     # R @ d per frame
    o = rel[:, None, :3, 3].expand_as(d)
    return torch.cat([o, d], -1).reshape(len(rel), h, w, 6)


def fold(pix: torch.Tensor) -> torch.Tensor:
    """[F, H, W, 6] -> [1, 6*64, F, H/8, W/8], channel c*64 + row*8 + col."""
    f, h, w, c = pix.shape
    x = pix.reshape(f, h // FOLD, FOLD, w // FOLD, FOLD, c)
    return x.permute(5, 2, 4, 0, 1, 3).reshape(1, c * FOLD * FOLD, f, h // FOLD, w // FOLD)


def _check(poses: torch.Tensor, intrinsics: torch.Tensor, name: str = "poses") -> None:
    if poses.ndim != 3 or poses.shape[1:] != (4, 4):
        raise ValueError(f"{name}: expected [N, 4, 4] camera-to-world matrices, got {list(poses.shape)}")
    if intrinsics.ndim != 2 or intrinsics.shape[1] != 4 or len(intrinsics) == 0:
        raise ValueError(f"intrinsics: expected [N, 4] (fx, fy, cx, cy), got {list(intrinsics.shape)}")
    if not torch.isfinite(intrinsics[0]).all() or (intrinsics[0, :2] == 0).any():
        raise ValueError("intrinsics: the first row (fx, fy, cx, cy) must be finite with fx, fy != 0")
    if not torch.isfinite(poses).all():
        raise ValueError(f"{name}: non-finite values")


def plucker_path(poses, intrinsics, image_hw, frame_num: int, chunk: int, max_area: int | None = None) -> dict:
    """The whole path, as upstream generate() computes it. Returns c2ws_interp, c2ws_relative, Ks and
    emb [1, 384, F, lat_h, lat_w] (float32)."""
    poses, intrinsics = torch.as_tensor(poses), torch.as_tensor(intrinsics)
    _check(poses, intrinsics)
    lat = latent_hw(image_hw, max_area if max_area is not None else image_hw[0] * image_hw[1])
    hw = (lat[0] * FOLD, lat[1] * FOLD)
    used, lat_f = frame_counts(len(poses), frame_num, chunk)
    if lat_f == 0:
        raise ValueError(f"poses: {len(poses)} poses give no complete chunk of {chunk} latent frames")
    interp = torch.from_numpy(resample_poses(poses[:used].double().numpy(), lat_f)).float()
    rel = framewise_relative(interp.double())
    scale = translation_scale(rel)
    if scale > 0:
        rel[:, :3, 3] /= scale
    K = scaled_intrinsics(intrinsics, hw)
    emb = fold(rays(rel, K.double(), hw)).float()
    return {"c2ws_interp": interp, "c2ws_relative": rel.float(), "Ks": K, "emb": emb}


def block_rays(poses, intrinsics, image_hw, prev: torch.Tensor | None, scale: float | None,
               max_area: int | None = None, latent: tuple[int, int] | None = None) -> torch.Tensor:
    """One block from its own latent-rate poses [f, 4, 4]: relative to ``prev`` (the previous block's
    last pose; None at the start), translations divided by ``scale`` (None: this block's largest
    norm). ``latent`` gives the latent size directly (else it follows from image_hw and max_area).
    -> [1, 384, f, lat_h, lat_w] float32."""
    poses, intrinsics = torch.as_tensor(poses), torch.as_tensor(intrinsics)
    _check(poses, intrinsics)
    lat = latent or latent_hw(image_hw, max_area if max_area is not None else image_hw[0] * image_hw[1])
    hw = (lat[0] * FOLD, lat[1] * FOLD)
    rel = framewise_relative(poses.double(), None if prev is None else torch.as_tensor(prev).double())
    s = translation_scale(rel) if scale is None else float(scale)
    if s > 0:
        rel[:, :3, 3] /= s
    return fold(rays(rel, scaled_intrinsics(intrinsics, hw).double(), hw)).float()


def described_path(frames: int, forward: float = 0.0, yaw: float = 0.0, right: float = 0.0, up: float = 0.0,
                   pitch: float = 0.0) -> torch.Tensor:
    """A smooth camera path of ``frames`` camera-to-world poses (OpenCV axes: x right, y down, z forward):
    over the path the camera turns ``yaw`` degrees left and ``pitch`` degrees up, and moves ``forward``,
    ``right`` and ``up`` metres in its own (turning) frame, at constant rates. -> [frames, 4, 4] float32."""
    if frames < 1:
        raise ValueError(f"camera path: frames must be >= 1, got {frames}")
    n = max(frames - 1, 1)
    out = torch.zeros(frames, 4, 4, dtype=torch.float64)
    pos = torch.zeros(3, dtype=torch.float64)
    step = torch.tensor([right, -up, forward], dtype=torch.float64) / n
    for i in range(frames):
        a, p = math.radians(-yaw) * i / n, math.radians(-pitch) * i / n   # +yaw: left, +pitch: up (y is down)
        ry = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]], dtype=torch.float64)
        rx = torch.tensor([[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]], dtype=torch.float64)
        r = ry @ rx
        if i:
            pos = pos + r @ step
        out[i, :3, :3], out[i, :3, 3], out[i, 3, 3] = r, pos, 1.0
    return out.float()
