"""Wan 2.1 DiT hyper-parameters and how to recover them from checkpoint files."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

# Every released Wan 2.1 DiT (1.3B, 14B) uses 128-dim heads; the state dict
# cannot tell heads from head size, so this is the fallback for num_heads.
DEFAULT_HEAD_DIM = 128


@dataclass(frozen=True)
class WanConfig:
    model_type: str = "t2v"          # 't2v' | 'i2v' (i2v adds img_emb + image K/V in cross-attention)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 2048
    ffn_dim: int = 8192
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 16
    num_layers: int = 32
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6

    def __post_init__(self):
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(f"model_type must be 't2v' or 'i2v', got {self.model_type!r}")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even size")
        object.__setattr__(self, "patch_size", tuple(self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_config_json(cls, d: dict, state_dict: dict | None = None) -> "WanConfig":
        """From a Wan-AI config.json (WanModel.save_config output) or case model_kwargs.

        That file omits patch_size, text_dim, qk_norm and cross_attn_norm (upstream's
        ignore_for_config), so they take upstream's defaults ((1,2,2), 4096, True, True)
        unless present; text_dim comes from `text_embedding.0.weight` when a state dict
        is given. Unknown keys (_class_name, window_size, ...) are ignored.
        """
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if state_dict is not None and "text_embedding.0.weight" in state_dict:
            cfg = replace(cfg, text_dim=state_dict["text_embedding.0.weight"].shape[1])
        return cfg

    @classmethod
    def from_state_dict(cls, sd: dict, num_heads: int | None = None, text_len: int = 512) -> "WanConfig":
        """Everything the weights determine. Not in the weights: num_heads (default
        dim // DEFAULT_HEAD_DIM, right for every Wan 2.1 release), text_len (default 512)
        and eps (1e-6)."""
        pe = sd["patch_embedding.weight"]                 # [dim, in_dim, pt, ph, pw]
        dim, in_dim, patch = pe.shape[0], pe.shape[1], tuple(pe.shape[2:])
        layers = sum(1 for k in sd if k.startswith("blocks.") and k.endswith(".modulation"))
        return cls(
            model_type="i2v" if "img_emb.proj.1.weight" in sd else "t2v",
            patch_size=patch, text_len=text_len, in_dim=in_dim, dim=dim,
            ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
            freq_dim=sd["time_embedding.0.weight"].shape[1],
            text_dim=sd["text_embedding.0.weight"].shape[1],
            out_dim=sd["head.head.weight"].shape[0] // math.prod(patch),
            num_heads=num_heads or dim // DEFAULT_HEAD_DIM, num_layers=layers,
            qk_norm="blocks.0.self_attn.norm_q.weight" in sd,
            cross_attn_norm="blocks.0.norm3.weight" in sd)


WAN_1_3B = WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, text_len=512)
WAN_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_len=512)
