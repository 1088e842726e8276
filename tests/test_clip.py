"""CLIP image encoder: key remaps (open-clip, Wan, HF) and Wan's penultimate features.

No golden exists. The open-clip path is checked against an independent
plain-torch ViT written here on the open-clip tensors (fused in_proj attention),
so a wrong q/k/v split, transpose or block count shows up as a mismatch.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from nodes.image.clip import (CLIPImageEncoder, build_clip_vision, penultimate_features, preprocess,
                              to_hf_state_dict)

DIM, HEADS, LAYERS, PATCH, GRID, OUT_DIM = 32, 4, 3, 4, 4, 24
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def open_clip_sd():
    """Random open-clip ViT (visual.*) plus a few text-tower keys that must be ignored."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else 1 / math.sqrt(shape[-1]))

    ffn = 4 * DIM
    sd = {
        "visual.conv1.weight": rnd(DIM, 3, PATCH, PATCH, scale=0.2),
        "visual.class_embedding": rnd(DIM, scale=0.5),
        "visual.positional_embedding": rnd(GRID * GRID + 1, DIM, scale=0.5),
        "visual.ln_pre.weight": 1 + rnd(DIM, scale=0.1), "visual.ln_pre.bias": rnd(DIM, scale=0.05),
        "visual.ln_post.weight": 1 + rnd(DIM, scale=0.1), "visual.ln_post.bias": rnd(DIM, scale=0.05),
        "visual.proj": rnd(DIM, OUT_DIM),
        "text.token_embedding.weight": rnd(10, DIM), "logit_scale": torch.tensor(4.6),
    }
    for i in range(LAYERS):
        b = f"visual.transformer.resblocks.{i}."
        sd.update({
            b + "ln_1.weight": 1 + rnd(DIM, scale=0.1), b + "ln_1.bias": rnd(DIM, scale=0.05),
            b + "attn.in_proj_weight": rnd(3 * DIM, DIM), b + "attn.in_proj_bias": rnd(3 * DIM, scale=0.05),
            b + "attn.out_proj.weight": rnd(DIM, DIM), b + "attn.out_proj.bias": rnd(DIM, scale=0.05),
            b + "ln_2.weight": 1 + rnd(DIM, scale=0.1), b + "ln_2.bias": rnd(DIM, scale=0.05),
            b + "mlp.c_fc.weight": rnd(ffn, DIM), b + "mlp.c_fc.bias": rnd(ffn, scale=0.05),
            b + "mlp.c_proj.weight": rnd(DIM, ffn), b + "mlp.c_proj.bias": rnd(DIM, scale=0.05),
        })
    return sd


def reference_penultimate(sd, pixels):
    """Open-clip ViT on its own tensors, stopped one block early, no ln_post (Wan's use_31_block)."""
    def ln(x, name):
        return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)

    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = ln(torch.cat([cls, x], 1) + sd["visual.positional_embedding"], "visual.ln_pre")
    n_layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("visual.transformer.resblocks."))
    for i in range(n_layers - 1):
        b = f"visual.transformer.resblocks.{i}."
        y = ln(x, b + "ln_1")
        qkv = y @ sd[b + "attn.in_proj_weight"].T + sd[b + "attn.in_proj_bias"]
        q, k, v = (t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in qkv.chunk(3, -1))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v
        a = a.transpose(1, 2).flatten(2)
        x = x + a @ sd[b + "attn.out_proj.weight"].T + sd[b + "attn.out_proj.bias"]
        y = ln(x, b + "ln_2")
        y = F.gelu(y @ sd[b + "mlp.c_fc.weight"].T + sd[b + "mlp.c_fc.bias"])
        x = x + y @ sd[b + "mlp.c_proj.weight"].T + sd[b + "mlp.c_proj.bias"]
    return x


def to_wan_layout(sd):
    """The same weights under Wan's XLMRobertaCLIP names (models_clip_open-clip-...-14.pth)."""
    ren = {"conv1.weight": "patch_embedding.weight", "ln_pre": "pre_norm", "ln_post": "post_norm",
           "ln_1": "norm1", "ln_2": "norm2", "attn.in_proj_weight": "attn.to_qkv.weight",
           "attn.in_proj_bias": "attn.to_qkv.bias", "attn.out_proj": "attn.proj", "mlp.c_fc": "mlp.0",
           "mlp.c_proj": "mlp.2"}
    out = {"visual.cls_embedding": sd["visual.class_embedding"].view(1, 1, -1),
           "visual.pos_embedding": sd["visual.positional_embedding"][None], "visual.head": sd["visual.proj"],
           "textual.head.0.weight": torch.zeros(2)}
    for k, v in sd.items():
        if not k.startswith("visual.") or k in ("visual.class_embedding", "visual.positional_embedding", "visual.proj"):
            continue
        k = k.replace("transformer.resblocks.", "transformer.")
        for a, b in ren.items():
            k = k.replace(a, b)
        out[k] = v
    return out


def pixels(batch=2, seed=1):
    return torch.randn(batch, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(seed))


def test_open_clip_remap_loads_strictly(open_clip_sd):
    model = build_clip_vision(open_clip_sd, num_heads=HEADS)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.patch_size, cfg.image_size, cfg.intermediate_size) == \
        (DIM, LAYERS, PATCH, GRID * PATCH, 4 * DIM)
    hf = to_hf_state_dict(open_clip_sd)
    assert set(hf) == set(model.state_dict())
    q, k, v = open_clip_sd["visual.transformer.resblocks.1.attn.in_proj_weight"].chunk(3)
    torch.testing.assert_close(model.encoder.layers[1].self_attn.k_proj.weight, k, atol=0, rtol=0)


def test_penultimate_matches_plain_torch_reference(open_clip_sd):
    model = build_clip_vision(open_clip_sd, num_heads=HEADS)
    x = pixels()
    out = penultimate_features(model, x)
    assert out.shape == (2, GRID * GRID + 1, DIM)
    torch.testing.assert_close(out, reference_penultimate(open_clip_sd, x), **TOL)
    # the same tensor diffusers takes: hidden_states[-2] of the full model
    with torch.no_grad():
        hs = model(pixel_values=x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out, hs[-2], **TOL)


def test_wan_layout_equals_open_clip(open_clip_sd):
    a = build_clip_vision(open_clip_sd, num_heads=HEADS)
    b = build_clip_vision(to_wan_layout(open_clip_sd), num_heads=HEADS)
    x = pixels(1, seed=2)
    torch.testing.assert_close(penultimate_features(b, x), penultimate_features(a, x), atol=0, rtol=0)


def test_diffusers_layout_loads():
    cfg = CLIPVisionConfig(hidden_size=DIM, intermediate_size=4 * DIM, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, patch_size=PATCH, image_size=GRID * PATCH,
                           hidden_act="gelu", projection_dim=OUT_DIM)
    torch.manual_seed(0)
    ref = CLIPVisionModelWithProjection(cfg).eval()
    sd = ref.state_dict()
    assert any(k.startswith("vision_model.") for k in sd) and "visual_projection.weight" in sd
    model = build_clip_vision(sd, num_heads=HEADS)
    x = pixels(1, seed=3)
    with torch.no_grad():
        want = ref(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(penultimate_features(model, x), want, **TOL)


def test_encoder_preprocesses_like_wan(open_clip_sd):
    enc = CLIPImageEncoder(open_clip_sd, num_heads=HEADS)
    img = torch.rand(1, 3, 23, 30) * 2 - 1  # any size, [-1, 1]
    size = GRID * PATCH
    x = F.interpolate(img, size=(size, size), mode="bicubic", align_corners=False) * 0.5 + 0.5
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess(img, size), (x - mean) / std, atol=0, rtol=0)
    torch.testing.assert_close(enc(img), reference_penultimate(open_clip_sd, (x - mean) / std), **TOL)


def test_unknown_visual_key_is_rejected(open_clip_sd):
    with pytest.raises(KeyError):
        to_hf_state_dict({**open_clip_sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.zeros(DIM)})
