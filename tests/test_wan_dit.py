"""Bidirectional Wan 2.1 DiT vs upstream WanModel goldens (T2V and I2V), plus config loading."""
import json

import pytest
import torch
from goldens import case_dir, case_json, optional_tensors, tensors

from nodes.common.attention import attention
from nodes.wan.config import WAN_1_3B, WAN_14B, WanConfig
from nodes.wan.dit import WanDiT

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

CASES = ["wan_t2v_dit", "wan_i2v_dit"]


def _model(case):
    cj = case_json(case)
    sd = tensors(case, cj["files"]["weights"])
    config_json = json.loads((case_dir(case) / cj["files"]["config"]).read_text())
    cfg = WanConfig.from_config_json(config_json, sd)
    assert cfg == WanConfig.from_config_json(cj["model_kwargs"])
    model = WanDiT(cfg)
    model.load_state_dict(sd, strict=True)
    return cj, model.eval()


def _inputs(cj, case):
    inp = tensors(case, cj["files"]["inputs"])
    n = sum(1 for k in inp if k.startswith("x."))
    x = [inp[f"x.{b}"] for b in range(n)]
    ctx = [inp[f"context.{b}"] for b in range(n)]
    y = [inp[f"y.{b}"] for b in range(n)] if "y.0" in inp else None
    return inp, x, ctx, y


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_upstream(case):
    cj, model = _model(case)
    inp, x, ctx, y = _inputs(cj, case)
    assert int(inp["seq_len"]) >= x[0][0].numel() // (model.cfg.patch_size[1] * model.cfg.patch_size[2])
    captured = {}

    def hook(name):
        return lambda mod, args, out: captured.__setitem__(name, out)

    hooks = [model.patch_embedding.register_forward_hook(hook("patch_embedding_out")),
             model.head.register_forward_hook(hook("head_out"))]
    hooks += [b.register_forward_hook(hook(f"block_{i}_out")) for i, b in enumerate(model.blocks)]
    name = "img_emb_out" if model.cfg.model_type == "i2v" else "text_embedding_out"
    hooks.append((model.img_emb if name == "img_emb_out" else model.text_embedding).register_forward_hook(hook(name)))
    with torch.no_grad():
        out = model(x, inp["t"], ctx, clip_fea=inp.get("clip_fea"), y=y)
        e, e0 = model.embed_time(inp["t"])
    for h in hooks:
        h.remove()
    tol = cj["tolerance"]
    torch.testing.assert_close(out, tensors(case, cj["files"]["outputs"])["output"], atol=tol["atol"], rtol=tol["rtol"])

    dbg = optional_tensors(case, "debug", cj["files"])   # intermediates, when the set ships them
    if dbg is None:
        return
    mine = dict(captured, time_embedding_out_e=e[:, 0], time_projection_out_e0=e0[:, 0].flatten(1))
    for key, gold in dbg.items():
        got = mine[key]
        if key == "patch_embedding_out":  # upstream embeds sample by sample; the hook kept the last
            got = got[-gold.shape[0]:]
        if key.startswith(("block_", "head_")):  # upstream pads tokens to seq_len
            gold = gold[:, :got.shape[1]]
        torch.testing.assert_close(got, gold, atol=tol["atol"], rtol=tol["rtol"], msg=lambda m: f"{key}: {m}")


def test_per_frame_timesteps_equal_uniform():
    cj, model = _model("wan_t2v_dit")
    inp, x, ctx, _ = _inputs(cj, "wan_t2v_dit")
    f = x[0].shape[1]
    with torch.no_grad():
        a = model(x, inp["t"], ctx)
        b = model(x, inp["t"][:, None].expand(-1, f), ctx)
    torch.testing.assert_close(a, b, atol=cj["tolerance"]["atol"], rtol=cj["tolerance"]["rtol"])


def test_config_defaults_and_inference():
    cj = case_json("wan_t2v_dit")
    config_json = json.loads((case_dir("wan_t2v_dit") / cj["files"]["config"]).read_text())
    bare = WanConfig.from_config_json(config_json)
    assert (bare.patch_size, bare.text_dim, bare.qk_norm, bare.cross_attn_norm) == ((1, 2, 2), 4096, True, True)
    sd = tensors("wan_t2v_dit", cj["files"]["weights"])
    kw = cj["model_kwargs"]
    inferred = WanConfig.from_state_dict(sd, num_heads=kw["num_heads"], text_len=kw["text_len"])
    assert inferred == WanConfig.from_config_json(kw)
    assert (WAN_1_3B.dim, WAN_1_3B.num_layers, WAN_1_3B.num_heads, WAN_1_3B.ffn_dim) == (1536, 30, 12, 8960)
    assert (WAN_14B.dim, WAN_14B.num_layers, WAN_14B.num_heads, WAN_14B.ffn_dim) == (5120, 40, 40, 13824)
    assert WAN_1_3B.head_dim == WAN_14B.head_dim == 128


def test_attention_backends_and_lse():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 3, 16), torch.randn(2, 9, 3, 16), torch.randn(2, 9, 3, 16)
    ref = attention(q, k, v, "math")
    for backend in ("auto", "flash"):  # the torch backends that exist on CPU
        torch.testing.assert_close(attention(q, k, v, backend), ref, atol=1e-5, rtol=1e-5)
    out, lse = attention(q, k, v, return_lse=True)
    assert lse.shape == (2, 5, 3) and lse.dtype == torch.float32  # [B, Lq, H]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # merging two key shards by their LSE reproduces the full attention
    (o1, l1), (o2, l2) = (attention(q, k[:, :4], v[:, :4], return_lse=True),
                          attention(q, k[:, 4:], v[:, 4:], return_lse=True))
    lse_all = torch.logaddexp(l1, l2)
    w1, w2 = (torch.exp(l - lse_all)[..., None] for l in (l1, l2))
    torch.testing.assert_close(w1 * o1 + w2 * o2, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_all, lse, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        attention(q, k, v, "nope")
