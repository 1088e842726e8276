"""Cosmos-Predict2 / 2.5 DiT (MiniTrainDIT) hyper-parameters, and how to recover them.

Sizes come from the weights: model width from the patch embedding, head size from the per-head
q-norm (so the head count is not a guess), depth, MLP width, cross-attention width, the AdaLN-LoRA
rank and, for Predict2.5, the ``crossattn_proj`` input width. What no tensor records (patch sizes,
RoPE extrapolation ratios, timestep scale, fps modulation, whether the padding-mask and
condition-mask channels are part of the input) comes from the model's config: upstream's
``model_kwargs`` dict (``from_model_kwargs``) or the node's params.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

PREFIXES = ("net.", "net_ema.")


@dataclass(frozen=True)
class CosmosConfig:
    in_channels: int = 16                 # latent channels (before the mask channels)
    out_channels: int = 16
    patch_spatial: int = 2
    patch_temporal: int = 1
    concat_padding_mask: bool = True      # + 1 input channel: the (resized) padding mask
    video_condition: bool = True          # MinimalV1LVGDiT: + 1 input channel, the condition-frame mask
    model_channels: int = 2048
    num_blocks: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    crossattn_emb_channels: int = 1024
    crossattn_proj_in_channels: int | None = None   # Predict2.5: Linear(+bias)+GELU from this width
    use_adaln_lora: bool = True
    adaln_lora_dim: int = 256
    rope_h_extrapolation_ratio: float = 1.0
    rope_w_extrapolation_ratio: float = 1.0
    rope_t_extrapolation_ratio: float = 1.0
    rope_enable_fps_modulation: bool = False
    base_fps: float = 24.0
    timestep_scale: float = 1.0
    eps: float = 1e-6

    def __post_init__(self):
        if self.model_channels % self.num_heads:
            raise ValueError(f"model_channels {self.model_channels} does not split into {self.num_heads} heads")
        if self.head_dim < 6 or self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} is too small or odd for 3-D RoPE")

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.model_channels * self.mlp_ratio)

    @property
    def patch_volume(self) -> int:
        return self.patch_temporal * self.patch_spatial ** 2

    @property
    def in_channels_total(self) -> int:
        return self.in_channels + int(self.video_condition) + int(self.concat_padding_mask)

    @property
    def predict25(self) -> bool:
        """Predict2.5 projects the (Cosmos-Reason1) text features with ``crossattn_proj``; Predict2 (T5) does not."""
        return self.crossattn_proj_in_channels is not None

    @classmethod
    def from_model_kwargs(cls, d: Mapping[str, Any], video_condition: bool = True) -> "CosmosConfig":
        """From upstream's MiniTrainDIT / MinimalV1LVGDiT constructor kwargs (``in_channels`` before the
        condition-mask channel MinimalV1LVGDiT adds). ``crossattn_proj_in_channels`` counts only when
        ``use_crossattn_projection`` is set (Predict2 configs carry the T5 width there unused)."""
        if d.get("pos_emb_cls", "rope3d") != "rope3d":
            raise ValueError(f"pos_emb_cls {d['pos_emb_cls']!r}: only rope3d is implemented")
        if d.get("extra_per_block_abs_pos_emb", False):
            raise ValueError("extra_per_block_abs_pos_emb: not implemented (no released 2B model uses it)")
        names = {f.name for f in fields(cls)} - {"crossattn_proj_in_channels", "video_condition"}
        kw = {k: v for k, v in d.items() if k in names}
        if d.get("use_crossattn_projection", False):
            kw["crossattn_proj_in_channels"] = d["crossattn_proj_in_channels"]
        return cls(video_condition=video_condition, **kw)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any], **config: Any) -> "CosmosConfig":
        """Every size the (native, un-prefixed) weights hold; ``config`` gives the rest (patch sizes,
        padding/condition mask channels, RoPE ratios, timestep scale) and is checked against the shapes."""
        shape = (lambda k: tuple(sd.shape(k))) if hasattr(sd, "shape") else (lambda k: tuple(sd[k].shape))
        base = cls(**{k: v for k, v in config.items() if k in {f.name for f in fields(cls)}})
        dim, cols = shape("x_embedder.proj.1.weight")
        head_dim = shape("blocks.0.self_attn.q_norm.weight")[0]
        blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        lora = "blocks.0.adaln_modulation_self_attn.2.weight" in sd
        pv = base.patch_volume
        out_rows = shape("final_layer.linear.weight")[0]
        masks = int(base.video_condition) + int(base.concat_padding_mask)
        if cols % pv or out_rows % pv:
            raise ValueError(f"x_embedder ({cols} inputs) / final_layer ({out_rows} outputs) do not fit patch "
                             f"{base.patch_temporal}x{base.patch_spatial}x{base.patch_spatial}")
        if cols // pv - masks < 1:
            raise ValueError(f"x_embedder has {cols // pv} input channels per patch, fewer than the {masks} mask "
                             "channels the config asks for")
        values = dict(
            in_channels=cols // pv - masks, out_channels=out_rows // pv, model_channels=dim,
            num_blocks=blocks, num_heads=dim // head_dim,
            mlp_ratio=shape("blocks.0.mlp.layer1.weight")[0] / dim,
            crossattn_emb_channels=shape("blocks.0.cross_attn.k_proj.weight")[1],
            crossattn_proj_in_channels=(shape("crossattn_proj.0.weight")[1] if "crossattn_proj.0.weight" in sd
                                        else None),
            use_adaln_lora=lora,
            adaln_lora_dim=shape("blocks.0.adaln_modulation_self_attn.1.weight")[0] if lora else base.adaln_lora_dim,
        )
        return cls(**{**{f.name: getattr(base, f.name) for f in fields(cls)}, **values})


def native_keys(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    """The network's own tensors of a released checkpoint: ``net.`` (else ``net_ema.``) stripped; training
    counters (``accum_*``), the recomputed RoPE tables (``pos_embedder.*``) and Transformer Engine
    ``*._extra_state`` entries dropped, as upstream's non-strict load ignores them."""
    keys = list(sd)
    prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in keys)), "")
    names = {}
    for k in keys:
        if prefix and not k.startswith(prefix):
            continue
        name = k[len(prefix):]
        if name.startswith(("accum_", "pos_embedder.")) or name.endswith("_extra_state"):
            continue
        names[name] = k
    if hasattr(sd, "renamed"):
        return sd.renamed(names)
    return {new: sd[old] for new, old in names.items()}
