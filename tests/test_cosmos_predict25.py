"""The Cosmos-Predict2.5 network (crossattn_proj, timestep_scale) against the `omnidreams_sv_dit` goldens.

OmniDreams' single-view DiT is Predict2.5's MiniTrainDIT plus an HDMap patch embedding added to the input
embedding. Its calls whose KV cache holds only the chunk itself (``kv_visible_tokens`` == tokens per chunk)
are plain bidirectional forwards of that chunk, which ``CosmosDiT`` must reproduce: the HDMap branch is added
here with a forward hook (it is OmniDreams', not Cosmos'), everything else is the family's network. Sizes and
config come from ``network_config`` and the variant.
"""
from __future__ import annotations

import pytest
import torch
from goldens import case_json, tensors, variant_params

from nodes.cosmos.config import CosmosConfig, native_keys
from nodes.cosmos.model import CosmosDiT, Patchify

torch.backends.cuda.matmul.allow_tf32 = False

CASE = "omnidreams_sv_dit"
HDMAP = "additional_patch_embedding.proj.1.weight"


def _model(cj, variant):
    sd = dict(native_keys(tensors(CASE, cj["weights"]["file"])))
    hd = sd.pop(HDMAP, None)
    net, tr = cj["network_config"], variant["transformer"]
    cfg = CosmosConfig.from_model_kwargs({
        **net, "rope_h_extrapolation_ratio": tr.get("h_extrapolation_ratio", 1.0),
        "rope_w_extrapolation_ratio": tr.get("w_extrapolation_ratio", 1.0),
        "rope_t_extrapolation_ratio": tr.get("t_extrapolation_ratio", 1.0)})
    assert cfg.predict25 and cfg.timestep_scale == net["timestep_scale"]
    assert CosmosConfig.from_state_dict(sd, **{k: getattr(cfg, k) for k in (
        "patch_spatial", "patch_temporal", "concat_padding_mask", "rope_h_extrapolation_ratio",
        "rope_w_extrapolation_ratio", "rope_t_extrapolation_ratio", "timestep_scale")}) == cfg
    model = CosmosDiT(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval(), hd


def _video(tokens: torch.Tensor, cfg: CosmosConfig, T: int, H: int, W: int) -> torch.Tensor:
    """[1, 1, T*h*w, C*kt*kh*kw] (tokens (t, h, w), features (c, kt, kh, kw)) -> [1, C, T, H, W]."""
    kt, k = cfg.patch_temporal, cfg.patch_spatial
    x = tokens.reshape(1, T // kt, H // k, W // k, -1, kt, k, k)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(1, -1, T, H, W)


@pytest.mark.parametrize("case,variant", variant_params([CASE]))
def test_first_chunk_calls_match_omnidreams(case, variant):
    cj = case_json(case)
    var = cj["variants"][variant]
    model, hd_weight = _model(cj, var)
    cfg = model.cfg
    inp, rec = tensors(case, "inputs.safetensors"), tensors(case, var["record_file"])
    H, W = inp["image_latent"].shape[-2:]
    T = var["transformer"]["len_t"]
    hdmap = inp["hdmap.0"][:, 0].transpose(1, 2)                                # [1, C, T, H, W]
    patchify = Patchify(cfg.patch_temporal, cfg.patch_spatial)
    hooks = []
    if hd_weight is not None:
        extra = patchify(hdmap) @ hd_weight.T                                   # [1, T', H', W', D]
        hooks.append(model.x_embedder.register_forward_hook(lambda m, a, out: out + extra))
    blocks = {}
    hooks += [b.register_forward_hook(lambda m, a, out, i=i: blocks.__setitem__(i, out))
              for i, b in enumerate(model.blocks)]
    text = inp["text_embeddings"][:, 0]                                         # [1, L, C_reason]
    per_chunk = var["transformer"]["tokens_per_chunk"]
    mask = torch.zeros(1, 1, T, H, W)
    mask[:, :, :1] = 1.0                                                        # chunk 0: first latent frame
    tol = {k: var["tolerance"][k] for k in ("atol", "rtol")}
    checked = 0
    with torch.no_grad():
        cross = model.prepare_cross(text)
        for call in var["calls"]:
            if call["chunk"] != 0 or call["kv_visible_tokens"] != per_chunk:
                continue
            assert call["cond_mask"] == "first_frame_ones"
            i = call["index"]
            x = _video(rec[f"call.{i}.net_input"], cfg, T, H, W)
            t = rec[f"call.{i}.timestep"].reshape(1, 1).expand(1, T // cfg.patch_temporal)
            out = model(x, t, condition_mask=mask, cross=cross)
            flow = patchify(out).reshape(1, 1, -1, out.shape[1] * cfg.patch_volume)
            torch.testing.assert_close(flow, rec[f"call.{i}.flow"], **tol, msg=lambda m: f"call {i}: {m}")
            if i == 0:
                for b, ref in ((b, rec[f"call0.block_{b}_out"]) for b in blocks if f"call0.block_{b}_out" in rec):
                    torch.testing.assert_close(blocks[b].reshape(ref.shape), ref, **tol)
            checked += 1
    for h in hooks:
        h.remove()
    assert checked == sum(1 for c in var["calls"] if c["chunk"] == 0 and c["kv_visible_tokens"] == per_chunk) >= 1
