"""Key layouts of Wan checkpoints and the tables that turn them into native names.

Native names are upstream's (Wan-Video/Wan2.1 ``wan/modules/model.py`` WanModel,
``wan/modules/vae.py`` WanVAE_), which the model modules of fd use, so the
official ``diffusion_pytorch_model*.safetensors`` / ``Wan2.1_VAE.pth`` load as
they are. Other layouts seen in the wild:

- diffusers ``WanTransformer3DModel`` (``Wan-AI/Wan2.1-*-Diffusers``, FastVideo's
  causal Wan 2.2 experts): names from diffusers' ``transformer_wan.py``, mapping
  checked against its ``scripts/convert_wan_to_diffusers.py``. Every tensor keeps
  its shape (``scale_shift_table`` is [1, 6, dim] / [1, 2, dim] on both sides),
  so the conversion is a pure rename. Diffusers numbers the block norms in call
  order (norm2 = the affine pre-cross-attention norm), upstream in creation
  order (norm3); norm1/norm2 of upstream have no parameters.
- Self-Forcing / Causal-Forcing training checkpoints (``self_forcing_dmd.pt``):
  ``{'generator': sd, 'generator_ema': sd, ...}`` with every key prefixed
  ``model.`` (the WanDiffusionWrapper attribute); native names after the prefix.
- diffusers ``AutoencoderKLWan`` for the Wan 2.1 VAE.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import CheckpointError
from .keymaps import KeyMap, apply, invert, keymap

_ATTN = [("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"), ("norm_q", "norm_q"), ("norm_k", "norm_k")]

DIT_DIFFUSERS_TO_NATIVE: KeyMap = keymap("wan dit: diffusers -> native", [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    # i2v / flf2v image branch: MLPProj = Sequential(LayerNorm, Linear, GELU, Linear, LayerNorm)
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    ("scale_shift_table", "head.modulation"),
    ("proj_out", "head.head"),
    *[(f"blocks.{{i}}.attn1.{d}", f"blocks.{{i}}.self_attn.{n}") for d, n in _ATTN],
    *[(f"blocks.{{i}}.attn2.{d}", f"blocks.{{i}}.cross_attn.{n}") for d, n in _ATTN],
    ("blocks.{i}.attn2.add_k_proj", "blocks.{i}.cross_attn.k_img"),
    ("blocks.{i}.attn2.add_v_proj", "blocks.{i}.cross_attn.v_img"),
    ("blocks.{i}.attn2.norm_added_k", "blocks.{i}.cross_attn.norm_k_img"),
    ("blocks.{i}.attn2.norm_added_q", None),  # in some early diffusers i2v files; diffusers ignores it too
    ("blocks.{i}.norm2", "blocks.{i}.norm3"),
    ("blocks.{i}.ffn.net.0.proj", "blocks.{i}.ffn.0"),
    ("blocks.{i}.ffn.net.2", "blocks.{i}.ffn.2"),
    ("blocks.{i}.scale_shift_table", "blocks.{i}.modulation"),
])
DIT_NATIVE_TO_DIFFUSERS: KeyMap = invert(DIT_DIFFUSERS_TO_NATIVE, "wan dit: native -> diffusers")

SELF_FORCING_TO_NATIVE: KeyMap = keymap("self-forcing generator -> native", [("model.{name}", "{name}")])

_RESNET = [("norm1", "residual.0"), ("conv1", "residual.2"), ("norm2", "residual.3"),
           ("conv2", "residual.6"), ("conv_shortcut", "shortcut")]


def wan21_vae_keymap(num_res_blocks: int = 2, num_stages: int = 4) -> KeyMap:
    """diffusers AutoencoderKLWan -> upstream WanVAE_ names for the Wan 2.1 VAE.

    The encoder is a flat list in both. The decoder's flat ``upsamples`` (per
    stage: num_res_blocks + 1 residual blocks, then a resample except after the
    last stage) becomes ``up_blocks.{stage}.resnets.{r}`` / ``.upsamplers.0``, so
    the table is generated for the block counts (Wan 2.1: 2 res blocks, 4 stages).
    """
    rules: list[tuple[str, str]] = []
    for side in ("encoder", "decoder"):
        rules += [(f"{side}.conv_in", f"{side}.conv1"), (f"{side}.norm_out", f"{side}.head.0"),
                  (f"{side}.conv_out", f"{side}.head.2"), (f"{side}.mid_block.attentions.0", f"{side}.middle.1")]
        for r, native in ((0, 0), (1, 2)):
            rules += [(f"{side}.mid_block.resnets.{r}.{d}", f"{side}.middle.{native}.{n}") for d, n in _RESNET]
    rules += [(f"encoder.down_blocks.{{i}}.{d}", f"encoder.downsamples.{{i}}.{n}") for d, n in _RESNET]
    rules.append(("encoder.down_blocks.{i}", "encoder.downsamples.{i}"))  # resample / time_conv
    per_stage = num_res_blocks + 2
    for stage in range(num_stages):
        for r in range(num_res_blocks + 1):
            rules += [(f"decoder.up_blocks.{stage}.resnets.{r}.{d}",
                       f"decoder.upsamples.{stage * per_stage + r}.{n}") for d, n in _RESNET]
        if stage < num_stages - 1:
            rules.append((f"decoder.up_blocks.{stage}.upsamplers.0",
                          f"decoder.upsamples.{stage * per_stage + num_res_blocks + 1}"))
    rules += [("quant_conv", "conv1"), ("post_quant_conv", "conv2")]
    return keymap("wan2.1 vae: diffusers -> native", rules)


VAE_DIFFUSERS_TO_NATIVE: KeyMap = wan21_vae_keymap()
VAE_NATIVE_TO_DIFFUSERS: KeyMap = invert(VAE_DIFFUSERS_TO_NATIVE, "wan2.1 vae: native -> diffusers")

# Tried by load.load_into to suggest a keymap when a checkpoint does not fit.
KNOWN_KEYMAPS: tuple[KeyMap, ...] = (
    DIT_DIFFUSERS_TO_NATIVE, DIT_NATIVE_TO_DIFFUSERS, SELF_FORCING_TO_NATIVE,
    VAE_DIFFUSERS_TO_NATIVE, VAE_NATIVE_TO_DIFFUSERS,
)

SELF_FORCING_ENTRIES = ("generator_ema", "generator")
_FUSED = (".to_qkv.", ".to_kv.", ".to_added_kv.")


def detect_layout(keys: Iterable[str]) -> str:
    """'native', 'diffusers' or 'self_forcing' for the keys of a Wan DiT checkpoint.

    ``keys`` may also be the top level of a Self-Forcing training file
    ('generator' / 'generator_ema').
    """
    keys = list(keys)
    if any(k in SELF_FORCING_ENTRIES for k in keys) or any(
            k.startswith("model.") and _native_like(k[len("model."):]) for k in keys):
        return "self_forcing"
    if any(k.startswith("condition_embedder.") or ".attn1." in k or ".attn2." in k for k in keys):
        return "diffusers"
    if any(_native_like(k) for k in keys):
        return "native"
    raise CheckpointError("keys match no known Wan DiT layout (native, diffusers, self_forcing); "
                          f"first keys: {', '.join(keys[:5])}")


def _native_like(key: str) -> bool:
    return key.startswith(("time_embedding.", "text_embedding.", "patch_embedding.", "head.")) or (
        ".self_attn." in key or ".cross_attn." in key)


def to_native(sd: Mapping[str, Any], *, ema: bool = True) -> Mapping[str, Any]:
    """A Wan DiT state dict of any known layout, renamed to native keys (tensors untouched).

    A Self-Forcing training dict picks 'generator_ema' (``ema=True``, falling back
    to 'generator') or 'generator'. A lazy ``load.Checkpoint`` stays lazy.
    """
    layout = detect_layout(sd.keys())
    if layout == "self_forcing":
        entries = [e for e in (SELF_FORCING_ENTRIES if ema else SELF_FORCING_ENTRIES[1:]) if e in sd]
        if entries:
            sd = sd[entries[0]]
        return to_native(apply(SELF_FORCING_TO_NATIVE, sd) if any(k.startswith("model.") for k in sd) else sd)
    if layout == "diffusers":
        fused = sorted(k for k in sd if any(f in k for f in _FUSED))
        if fused:
            raise CheckpointError(f"diffusers checkpoint with fused attention projections ({fused[0]}, ...): "
                                  "save it from the model after unfuse_qkv_projections()")
        return apply(DIT_DIFFUSERS_TO_NATIVE, sd)
    return sd
