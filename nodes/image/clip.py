"""Wan I2V's image encoder: the ViT-H/14 tower of open-clip XLM-RoBERTa CLIP, on HF ``CLIPVisionModel``.

Wan conditions on the *penultimate* tokens: ``visual(x, use_31_block=True)``
(wan/modules/clip.py) runs patch embedding + class token + positions, the
pre-LayerNorm, then the first 31 of 32 blocks, and returns all 257 tokens with
no post-LayerNorm and no projection. Diffusers' Wan I2V pipeline takes the same
tensor as ``hidden_states[-2]`` of its ``image_encoder``.

Weights come in three layouts, each mapped by a declarative table below:
Wan's ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (Wan's own
module names: ``visual.transformer.{i}.attn.to_qkv``...), open-clip's
(``visual.transformer.resblocks.{i}.attn.in_proj_weight``...) and HF's
(diffusers ``image_encoder`` folder, ``vision_model.*``). Fused q/k/v
projections are split into HF's three. Text-tower keys are ignored.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WAN_VISION_HEADS = 16  # ViT-H/14; the head count is not recoverable from the weights

_L = "encoder.layers.{i}."
# (source pattern, HF CLIPVisionModel key or None for "known, unused", transform).
# {i}: layer index; {p}: weight|bias. Transforms: "flat" -> 1-D, "rows" -> 2-D
# [tokens, dim], "qkv" -> fused [3*dim, ...] split into q_proj, k_proj, v_proj.
WAN_VISUAL_KEYS: tuple[tuple[str, str | None, str | None], ...] = (
    ("visual.patch_embedding.weight", "embeddings.patch_embedding.weight", None),
    ("visual.cls_embedding", "embeddings.class_embedding", "flat"),
    ("visual.pos_embedding", "embeddings.position_embedding.weight", "rows"),
    ("visual.pre_norm.{p}", "pre_layrnorm.{p}", None),
    ("visual.transformer.{i}.norm1.{p}", _L + "layer_norm1.{p}", None),
    ("visual.transformer.{i}.attn.to_qkv.{p}", _L + "self_attn.{qkv}_proj.{p}", "qkv"),
    ("visual.transformer.{i}.attn.proj.{p}", _L + "self_attn.out_proj.{p}", None),
    ("visual.transformer.{i}.norm2.{p}", _L + "layer_norm2.{p}", None),
    ("visual.transformer.{i}.mlp.0.{p}", _L + "mlp.fc1.{p}", None),
    ("visual.transformer.{i}.mlp.2.{p}", _L + "mlp.fc2.{p}", None),
    ("visual.post_norm.{p}", "post_layernorm.{p}", None),
    ("visual.head", None, None),  # projection to the joint embedding: Wan does not use it
)
OPEN_CLIP_VISUAL_KEYS: tuple[tuple[str, str | None, str | None], ...] = (
    ("visual.conv1.weight", "embeddings.patch_embedding.weight", None),
    ("visual.class_embedding", "embeddings.class_embedding", "flat"),
    ("visual.positional_embedding", "embeddings.position_embedding.weight", "rows"),
    ("visual.ln_pre.{p}", "pre_layrnorm.{p}", None),
    ("visual.transformer.resblocks.{i}.ln_1.{p}", _L + "layer_norm1.{p}", None),
    ("visual.transformer.resblocks.{i}.attn.in_proj_{p}", _L + "self_attn.{qkv}_proj.{p}", "qkv"),
    ("visual.transformer.resblocks.{i}.attn.out_proj.{p}", _L + "self_attn.out_proj.{p}", None),
    ("visual.transformer.resblocks.{i}.ln_2.{p}", _L + "layer_norm2.{p}", None),
    ("visual.transformer.resblocks.{i}.mlp.c_fc.{p}", _L + "mlp.fc1.{p}", None),
    ("visual.transformer.resblocks.{i}.mlp.c_proj.{p}", _L + "mlp.fc2.{p}", None),
    ("visual.ln_post.{p}", "post_layernorm.{p}", None),
    ("visual.proj", None, None),
)
# HF checkpoints (transformers 4.x CLIPVisionModel[WithProjection]) nest the tower
# under vision_model.; the projection head and the position_ids buffer are not ours.
HF_PREFIX = "vision_model."
HF_UNUSED = ("visual_projection.weight", "embeddings.position_ids")

_TRANSFORMS: dict[str | None, Callable[[torch.Tensor], torch.Tensor]] = {
    None: lambda v: v,
    "flat": lambda v: v.reshape(-1),
    "rows": lambda v: v.reshape(-1, v.shape[-1]),
}


def _compile(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile("^" + rx + "$")


def _apply_table(sd: Mapping[str, torch.Tensor], table) -> dict[str, torch.Tensor]:
    rules = [(_compile(src), dst, fn) for src, dst, fn in table]
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not k.startswith("visual."):
            continue  # text tower, logit scale
        for rx, dst, fn in rules:
            m = rx.match(k)
            if not m:
                continue
            if dst is not None and fn == "qkv":
                for name, part in zip("qkv", v.chunk(3, dim=0)):
                    out[dst.format(qkv=name, **m.groupdict())] = part
            elif dst is not None:
                out[dst.format(**m.groupdict())] = _TRANSFORMS[fn](v)
            break
        else:
            raise KeyError(f"unexpected key in CLIP visual state dict: {k!r}")
    return out


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    if "visual.conv1.weight" in sd:
        return "open_clip"
    if "visual.patch_embedding.weight" in sd:
        return "wan"
    if any(k.startswith(HF_PREFIX) or k.startswith("embeddings.") for k in sd):
        return "hf"
    raise KeyError("not a CLIP vision state dict (no visual.conv1 / visual.patch_embedding / vision_model.)")


def to_hf_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout -> HF ``CLIPVisionModel`` keys (transformers 5: no ``vision_model.`` prefix)."""
    layout = detect_layout(sd)
    if layout == "open_clip":
        return _apply_table(sd, OPEN_CLIP_VISUAL_KEYS)
    if layout == "wan":
        return _apply_table(sd, WAN_VISUAL_KEYS)
    out = {}
    for k, v in sd.items():
        k = k[len(HF_PREFIX):] if k.startswith(HF_PREFIX) else k
        if k not in HF_UNUSED:
            out[k] = v
    return out


def config_from_state_dict(sd: Mapping[str, torch.Tensor], num_heads: int = WAN_VISION_HEADS) -> CLIPVisionConfig:
    """CLIPVisionConfig from shapes; pre-LN ViT with exact GELU and eps 1e-5 as Wan/open-clip ViT-H."""
    sd = to_hf_state_dict(sd)
    hidden, channels, patch, _ = sd["embeddings.patch_embedding.weight"].shape
    grid = round((sd["embeddings.position_embedding.weight"].shape[0] - 1) ** 0.5)
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    return CLIPVisionConfig(
        hidden_size=int(hidden), intermediate_size=int(sd["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=layers, num_attention_heads=num_heads, num_channels=int(channels),
        patch_size=int(patch), image_size=int(grid * patch), hidden_act="gelu", layer_norm_eps=1e-5)


def build_clip_vision(sd: Mapping[str, torch.Tensor], *, num_heads: int = WAN_VISION_HEADS,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> CLIPVisionModel:
    """Build on the meta device and load ``sd`` (Wan, open-clip or HF layout) strictly by assignment."""
    hf = to_hf_state_dict(sd)
    with torch.device("meta"):
        model = CLIPVisionModel(config_from_state_dict(hf, num_heads))
    model.load_state_dict(hf, strict=True, assign=True)
    n_pos = model.embeddings.num_positions  # the non-persistent position_ids buffer is still on meta
    model.embeddings.position_ids = torch.arange(n_pos).expand(1, -1)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


@torch.no_grad()
def penultimate_features(model: CLIPVisionModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Normalised pixels [B, 3, S, S] -> tokens [B, 1 + (S/patch)^2, hidden] after all but the last block."""
    w = model.embeddings.patch_embedding.weight
    h = model.pre_layrnorm(model.embeddings(pixel_values.to(device=w.device, dtype=w.dtype)))
    for layer in model.encoder.layers[:-1]:
        h = layer(h, None)
    return h


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> CLIP input [B, 3, size, size], as Wan's ``CLIPModel.visual``.

    Bicubic resize (no antialias, align_corners=False, no clamp) of the [-1, 1]
    image, then to [0, 1] and CLIP mean/std normalisation.
    """
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = x.new_tensor(CLIP_MEAN).view(1, -1, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, -1, 1, 1)
    return (x - mean) / std


class CLIPImageEncoder:
    """Conditioning images in [-1, 1] -> Wan's CLIP context tokens [B, 257, 1280] (ViT-H/14)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, num_heads: int = WAN_VISION_HEADS):
        self.model = build_clip_vision(state_dict, num_heads=num_heads, device=device, dtype=dtype)

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return penultimate_features(self.model, preprocess(images, self.image_size))
