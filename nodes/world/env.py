"""The procedural world the `world_cpu` model was trained on: a camera walking over a textured plane.

Why it exists: a world model needs a world whose ground truth we can render for any action
sequence, so training data costs nothing and a test can compare a rollout with the truth. It is
pure torch (no game engine), renders a batch of poses at once (on the GPU while training), and is
deterministic: the frames are a function of the actions alone.

The world: an infinite ground plane, periodic with period ``WorldLayout.period`` (so a walk never
leaves the part the model learned), a soft checkerboard tinted by a slow colour field (so where you
stand is visible), coloured spheres resting on it, fog towards a sky gradient. The camera stands
at eye height, pitched slightly down.

Actions, one letter per frame (``ACTIONS``): W/S step forward/back, A/D turn left/right, Q/E strafe
left/right, ``.`` stand still. A frame's pose is the previous pose moved by its own action, so
frame 0 already shows action 0. ``parse_actions("W*16 A*8 W*16")`` expands a script.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACTIONS = "WSADQE."          # action id = index in this string
IDLE = ACTIONS.index(".")
_TOKEN = re.compile(r"([A-Za-z.]+)(?:\*(\d+))?$")


def parse_actions(script: str, max_frames: int = 1_000_000) -> list[int]:
    """``"W*16 A*8 WWD ."`` -> action ids, one per frame. Tokens are separated by spaces or commas;
    a token is letters (one frame each) optionally followed by ``*N`` (the letters N times).
    Raises ValueError naming the bad token and what is allowed."""
    out: list[int] = []
    for tok in re.split(r"[\s,]+", script.strip()):
        if not tok:
            continue
        m = _TOKEN.match(tok)
        if m is None:
            raise ValueError(f"bad action token {tok!r}: expected letters of {ACTIONS!r}, optionally *N "
                             "(e.g. W*16 or WWAD)")
        letters, count = m.group(1).upper(), int(m.group(2) or 1)
        bad = sorted(set(letters) - set(ACTIONS))
        if bad:
            raise ValueError(f"bad action letter(s) {''.join(bad)!r} in {tok!r}: W/S forward/back, A/D turn "
                             "left/right, Q/E strafe left/right, '.' stand still")
        out.extend([ACTIONS.index(c) for c in letters] * count)
        if len(out) > max_frames:
            raise ValueError(f"action script longer than {max_frames} frames")
    return out


@dataclass(frozen=True)
class Motion:
    """How far one action moves the camera."""
    step: float = 0.3            # world units per W/S/Q/E frame
    turn_deg: float = 5.0        # degrees per A/D frame


@dataclass(frozen=True)
class Camera:
    size: int = 64               # output frames are size x size
    fov_deg: float = 70.0        # horizontal field of view
    height: float = 1.0          # eye height above the ground
    tilt: float = 0.22           # downward pitch (tangent units): the horizon sits above the centre
    supersample: int = 2         # render at size * supersample, average down (no shimmering checkers)


@dataclass(frozen=True)
class WorldLayout:
    period: float = 16.0
    checker: float = 2.0          # checker square size (divides period)
    fog: float = 9.0              # distance at which 63% of the colour is fog
    reach: float = 24.0           # spheres farther than this are not drawn (93% fog there)
    # spheres: (x, z, radius, r, g, b) inside one period cell
    spheres: tuple = ((1.5, 5.0, 0.9, 0.85, 0.15, 0.12), (-3.0, 8.0, 1.2, 0.15, 0.35, 0.9),
                      (4.5, 11.0, 1.0, 0.95, 0.8, 0.1), (-6.0, 2.5, 0.8, 0.7, 0.2, 0.8),
                      (7.0, -3.5, 1.1, 0.1, 0.75, 0.7), (-2.0, -6.0, 1.0, 0.95, 0.5, 0.1),
                      (3.0, -9.0, 0.7, 0.9, 0.9, 0.9))


@dataclass(frozen=True)
class World:
    """The renderer: ``poses(actions)`` integrates actions, ``render(poses)`` draws them."""
    camera: Camera = Camera()
    layout: WorldLayout = WorldLayout()
    motion: Motion = Motion()

    def poses(self, actions: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """actions [B, T] ids -> poses [B, T, 3] (x, z, yaw radians) after each frame's action, from
        ``start`` [B, 3] (default the origin facing +z)."""
        actions = actions.long()
        b, t = actions.shape
        dev = actions.device
        pose = torch.zeros(b, 3, device=dev) if start is None else start.to(dev).float().clone()
        table = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 0, -1], [0, 0, 1], [0, -1, 0], [0, 1, 0], [0, 0, 0]],
                             dtype=torch.float32, device=dev)   # (forward, right, turn) per ACTIONS letter
        out = []
        turn = math.radians(self.motion.turn_deg)
        for i in range(t):
            fwd, right, yaw = table[actions[:, i]].unbind(-1)
            heading = pose[:, 2] + yaw * turn
            sx, cz = torch.sin(heading), torch.cos(heading)
            dx = self.motion.step * (fwd * sx + right * cz)
            dz = self.motion.step * (fwd * cz - right * sx)
            pose = torch.stack([pose[:, 0] + dx, pose[:, 1] + dz, heading], -1)
            out.append(pose)
        return torch.stack(out, 1)

    def render(self, poses: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """poses [..., 3] -> frames [..., 3, size, size] float in [-1, 1] (on the poses' device)."""
        lead = poses.shape[:-1]
        flat = poses.reshape(-1, 3).float()
        frames = [self._render(flat[i:i + chunk]) for i in range(0, flat.shape[0], chunk)]
        return torch.cat(frames).reshape(*lead, 3, self.camera.size, self.camera.size)

    def rollout(self, script: str | list[int], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Ground truth of one script: (actions [1, T], frames [1, T, 3, size, size])."""
        ids = parse_actions(script) if isinstance(script, str) else list(script)
        actions = torch.tensor([ids], dtype=torch.long, device=device)
        return actions, self.render(self.poses(actions))

    # ------------------------------------------------------------------ drawing
    def _rays(self, device) -> torch.Tensor:
        """Camera-space unit ray directions [R, 3] (right, up, forward), R = (size*supersample)^2."""
        cam = self.camera
        n = cam.size * cam.supersample
        half = math.tan(math.radians(cam.fov_deg) / 2)
        c = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n * 2 - 1
        v, u = torch.meshgrid(c, c, indexing="ij")
        d = torch.stack([u * half, -v * half - cam.tilt, torch.ones_like(u)], -1).reshape(-1, 3)
        return d / d.norm(dim=-1, keepdim=True)

    def _render(self, poses: torch.Tensor) -> torch.Tensor:
        cam, lay = self.camera, self.layout
        dev = poses.device
        d_cam = self._rays(dev)                                        # [R, 3]
        s, c = torch.sin(poses[:, 2])[:, None], torch.cos(poses[:, 2])[:, None]
        # world direction: right = (c, 0, -s), up = (0, 1, 0), forward = (s, 0, c)   (x, y, z)
        dx = d_cam[None, :, 0] * c + d_cam[None, :, 2] * s
        dz = -d_cam[None, :, 0] * s + d_cam[None, :, 2] * c
        dy = d_cam[None, :, 1].expand_as(dx)
        ox, oz, oy = poses[:, 0:1], poses[:, 1:2], cam.height
        # sky
        sky_t = dy.clamp(min=0).pow(0.6)[..., None]
        horizon = torch.tensor([0.82, 0.86, 0.9], device=dev)
        zenith = torch.tensor([0.25, 0.45, 0.85], device=dev)
        color = horizon + (zenith - horizon) * sky_t
        # ground
        down = dy < -1e-4
        tg = torch.where(down, oy / (-dy).clamp(min=1e-4), torch.full_like(dy, float("inf")))
        gx, gz = ox + tg.clamp(max=1e4) * dx, oz + tg.clamp(max=1e4) * dz
        ground = self._ground(gx, gz)
        depth = tg
        fog_of = lambda t: (1 - torch.exp(-t / lay.fog))[..., None]  # noqa: E731
        color = torch.where(down[..., None], ground + (horizon - ground) * fog_of(tg.clamp(max=1e4)), color)
        # spheres (every periodic copy within reach)
        light = torch.tensor([0.4, 0.8, -0.45], device=dev)
        light = light / light.norm()
        per = lay.period
        for (sx, sz, r, *rgb) in lay.spheres:
            base_x = sx + per * torch.round((ox - sx) / per)
            base_z = sz + per * torch.round((oz - sz) / per)
            for i in (-1, 0, 1):
                for j in (-1, 0, 1):
                    cx, cz = base_x + i * per, base_z + j * per          # [N, 1]
                    if float(((ox - cx) ** 2 + (oz - cz) ** 2).min()) > (lay.reach + r) ** 2:
                        continue                                         # lost in the fog for every pose
                    lx, ly, lz = ox - cx, oy - r, oz - cz               # origin - centre
                    bq = lx * dx + ly * dy + lz * dz
                    cq = lx * lx + ly * ly + lz * lz - r * r
                    disc = bq * bq - cq
                    th = -bq - torch.sqrt(disc.clamp(min=0))
                    hit = (disc > 0) & (th > 0) & (th < depth)
                    if not bool(hit.any()):
                        continue
                    nx, ny, nz = (lx + th * dx) / r, (ly + th * dy) / r, (lz + th * dz) / r
                    lam = (nx * light[0] + ny * light[1] + nz * light[2]).clamp(min=0)
                    shade = (0.35 + 0.65 * lam)[..., None] * torch.tensor(rgb, device=dev)
                    shade = shade + (horizon - shade) * fog_of(th.clamp(min=0))
                    color = torch.where(hit[..., None], shade, color)
                    depth = torch.where(hit, th, depth)
        n = cam.size * cam.supersample
        img = color.reshape(-1, n, n, 3).permute(0, 3, 1, 2)
        if cam.supersample > 1:
            img = F.avg_pool2d(img, cam.supersample)
        return img.clamp(0, 1) * 2 - 1

    def _ground(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Soft checkerboard (two greens/sands) tinted by a slow periodic colour field: [..., 3]."""
        lay = self.layout
        k = math.pi / lay.checker
        chk = torch.sigmoid(10 * torch.sin(k * x) * torch.sin(k * z))[..., None]
        a = torch.tensor([0.30, 0.55, 0.22], device=x.device)
        b = torch.tensor([0.62, 0.58, 0.38], device=x.device)
        base = a + (b - a) * chk
        w = 2 * math.pi / lay.period
        tint = torch.stack([0.12 * torch.sin(w * x), 0.06 * torch.cos(w * z), 0.12 * torch.sin(w * (x + z))], -1)
        return (base + tint).clamp(0, 1)


def random_actions(batch: int, frames: int, generator: torch.Generator | None = None,
                   device="cpu") -> torch.Tensor:
    """Training walks: sticky random actions (a letter held 1-10 frames), forward most often, as a
    person steering with a keyboard would. [batch, frames] ids."""
    probs = torch.tensor([0.32, 0.08, 0.16, 0.16, 0.1, 0.1, 0.08])
    out = torch.empty(batch, frames, dtype=torch.long)
    for b in range(batch):
        i = 0
        while i < frames:
            a = int(torch.multinomial(probs, 1, generator=generator))
            n = int(torch.randint(1, 11, (1,), generator=generator))
            out[b, i:i + n] = a
            i += n
    return out.to(device)
