"""LingBot-World DiT config: WanModelFast's config.json (or model kwargs) as a WanConfig.

WanModelFast is Wan I2V by input (in_dim 36 = noise | 4-ch mask | image latent) but has no CLIP
branch: in WanConfig terms (where model_type 'i2v' means the CLIP image branch) it is model_type
't2v' with in_dim 36 and control_type 'cam' (the camera layers). The file omits patch_size,
text_dim, qk_norm and cross_attn_norm (upstream's ignore_for_config); text_dim comes from the
weights when a state dict is given.
"""
from __future__ import annotations

from dataclasses import replace

from nodes.wan.config import WanConfig


def lingbot_config(d: dict, state_dict: dict | None = None) -> WanConfig:
    d = dict(d)
    d["model_type"] = "t2v"  # no CLIP branch (no img_emb / image K/V), whatever the file says
    cfg = WanConfig.from_config_json(d, state_dict)
    if state_dict is not None:
        cam = "cam" if "patch_embedding_wancamctrl.weight" in state_dict else None
        if cfg.control_type != cam:
            cfg = replace(cfg, control_type=cam)
    return cfg
