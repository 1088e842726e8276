"""Sizes of the world model, read from the config.json shipped next to its weights.

One file describes both networks (the action-conditioned causal Wan DiT and the tiny frame
decoder) and how they were trained to be driven (frames per block, KV window, steps): the nodes
read every size from it, never from a default, and check it against the weights' shapes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from nodes.wan.config import WanConfig

from .env import ACTIONS


@dataclass(frozen=True)
class DecoderConfig:
    latent_channels: int = 8
    channels: tuple[int, ...] = (64, 32, 16)   # widths at 1/4, 1/2 and full resolution (two 2x upsamplings)

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if len(self.channels) != 3:
            raise ValueError(f"decoder channels: three widths (1/4, 1/2, full resolution), got {self.channels}")

    @property
    def downsample(self) -> int:
        return 4


@dataclass(frozen=True)
class WorldConfig:
    dit: WanConfig
    decoder: DecoderConfig
    actions: str = ACTIONS
    frame_size: int = 64
    frames_per_block: int = 4
    window_frames: int = 16          # KV window the DiT was trained with (own block included)
    steps: tuple[int, ...] = (1000, 667, 333)
    shift: float = 5.0
    training: dict = field(default_factory=dict)   # what the training script recorded (for the model card)

    @property
    def num_actions(self) -> int:
        return len(self.actions)

    @property
    def latent_size(self) -> int:
        return self.frame_size // self.decoder.downsample

    def to_json(self) -> dict:
        d = asdict(self)
        d["dit"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d["dit"].items()}
        return d

    @classmethod
    def from_json(cls, d: dict, where: str = "config.json") -> "WorldConfig":
        try:
            dit_names = {f.name for f in fields(WanConfig)}
            dit = WanConfig(**{k: v for k, v in d["dit"].items() if k in dit_names})
            dec = DecoderConfig(**d["decoder"])
            rest = {f.name: d[f.name] for f in fields(cls) if f.name not in ("dit", "decoder") and f.name in d}
            if "steps" in rest:
                rest["steps"] = tuple(int(s) for s in rest["steps"])
            cfg = cls(dit=dit, decoder=dec, **rest)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: not a world model config ({type(e).__name__}: {e})") from None
        if cfg.dit.in_dim != dec.latent_channels or cfg.dit.out_dim != dec.latent_channels:
            raise ValueError(f"{where}: DiT in/out channels {cfg.dit.in_dim}/{cfg.dit.out_dim} != decoder latent "
                             f"channels {dec.latent_channels}")
        return cfg

    @classmethod
    def read(cls, path: str | Path) -> "WorldConfig":
        path = Path(path)
        try:
            return cls.from_json(json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
