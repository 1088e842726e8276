"""The released OmniDreams checkpoint layout (``net.*`` keys, CosmosDiTNetwork names) -> ``OmniDreamsNet``.

Facts of the public file (``single_view/2b_res720p_30fps_i2v_hdmap_distilled.pt``):
- ``x_embedder.proj.1.weight`` has (latent + condition mask + padding mask) x kt*kh*kw input columns in
  (c, kt, kh, kw) order. ``CosmosDiT`` keeps the padding-mask columns and feeds that channel zeros, which is
  what dropping them (as the inference code does) computes.
- ``final_layer.linear.weight`` rows are in (kt, kh, kw, c) order; ``CosmosDiT.unpatchify`` reads (kh, kw, kt, c),
  so the rows are permuted here when kt > 1 (with kt = 1 the two orders coincide).
- the HD-map branch ``additional_patch_embedding.proj.1.weight`` [D, C_hd * kt*kh*kw], no bias.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from nodes.cosmos.config import CosmosConfig

from .model import HDMAP_KEY

FINAL = "final_layer.linear.weight"


VIEW_KEY = "adaln_view_embedder.weight"


def config_from_state_dict(sd: Mapping[str, Any], **config: Any) -> tuple[CosmosConfig, int, int]:
    """(Cosmos config, HD-map channels, camera embedding rows (0: single view)) from the native (un-prefixed)
    weights; ``config`` as ``CosmosConfig.from_state_dict`` (patch sizes, RoPE ratios, timestep scale, padding
    mask). A multi-view checkpoint has the view AdaLN embedder and cross-view attention in every block."""
    if HDMAP_KEY not in sd:
        raise ValueError(f"no {HDMAP_KEY}: not an OmniDreams (HD-map conditioned) checkpoint")
    cfg = CosmosConfig.from_state_dict(sd, **config)
    if not cfg.predict25:
        raise ValueError("no crossattn_proj: OmniDreams is a Cosmos-Predict2.5 network")
    shape = tuple(sd.shape(HDMAP_KEY)) if hasattr(sd, "shape") else tuple(sd[HDMAP_KEY].shape)
    if shape[0] != cfg.model_channels or shape[1] % cfg.patch_volume:
        raise ValueError(f"{HDMAP_KEY} {list(shape)} does not fit width {cfg.model_channels} and patch volume "
                         f"{cfg.patch_volume}")
    cams = 0
    if VIEW_KEY in sd:
        cams = (tuple(sd.shape(VIEW_KEY)) if hasattr(sd, "shape") else tuple(sd[VIEW_KEY].shape))[0]
        if "blocks.0.cross_view_attn.q_proj.weight" not in sd:
            raise ValueError(f"{VIEW_KEY} but no blocks.*.cross_view_attn: an incomplete multi-view checkpoint")
    return cfg, shape[1] // cfg.patch_volume, cams


def final_rows_to_module(w: torch.Tensor, cfg: CosmosConfig) -> torch.Tensor:
    """final_layer rows (kt, kh, kw, c) of the checkpoint -> (kh, kw, kt, c) of ``CosmosDiT``."""
    kt, k = cfg.patch_temporal, cfg.patch_spatial
    if kt == 1:
        return w
    return w.reshape(kt, k, k, -1, w.shape[-1]).permute(1, 2, 0, 3, 4).reshape(w.shape)


def to_module(sd: Mapping[str, torch.Tensor], cfg: CosmosConfig) -> dict[str, torch.Tensor]:
    out = dict(sd)
    out[FINAL] = final_rows_to_module(out[FINAL], cfg)
    return out
