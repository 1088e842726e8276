"""diffusers-layout Wan DiT folders (config.json + safetensors, as ``save_pretrained`` writes them) with
non-release sizes: ``wan.dit`` reads every size from config.json (heads, head dim, eps, image_dim, ...),
checks it against the weights, and the loaded model matches the native one it was saved from. A folder
that cannot tell its sizes is refused with a message, never built with release defaults."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_wan22_node import save_diffusers

from engine.errors import FdError
from nodes.checkpoint import CheckpointError
from nodes.common.kv_cache import SelfKVCache
from nodes.wan.config import WanConfig
from nodes.wan.dit import WanDiT
from nodes.wan.node_dit import WanDiTNode

CONFIGS = {
    # 3 heads of 32, 2 layers, eps 1e-5, other freq_dim / text_dim: none of them a release value
    "t2v_3x32": WanConfig(dim=96, num_heads=3, ffn_dim=80, num_layers=2, text_dim=24, freq_dim=64, eps=1e-5,
                          text_len=7),
    "t2v_4x8_noqk": WanConfig(dim=32, num_heads=4, ffn_dim=40, num_layers=3, text_dim=20, freq_dim=32, eps=1e-6,
                              text_len=5, qk_norm=False, cross_attn_norm=False, out_dim=8),
    "i2v_2x24_img40": WanConfig(model_type="i2v", dim=48, num_heads=2, ffn_dim=64, num_layers=2, text_dim=16,
                                freq_dim=32, eps=1e-5, text_len=6, in_dim=36, image_dim=40),
}


def _random_model(cfg: WanConfig, seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    m = WanDiT(cfg)
    with torch.no_grad():
        for p in m.parameters():   # non-trivial norms / biases too
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def _node(folder: Path, text_len: int, **params) -> WanDiTNode:
    node = WanDiTNode("dit", {"checkpoint": str(folder), "text_len": text_len, "dtype": "fp32", **params}, "cpu")
    node.load()
    return node


def _inputs(cfg: WanConfig, frames=3, h=6, w=10):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16 if cfg.model_type == "t2v" else 16, frames, h, w, generator=g)
    ctx = torch.randn(1, cfg.text_len - 1, cfg.text_dim, generator=g)
    extra = {}
    if cfg.model_type == "i2v":
        extra = {"clip_fea": torch.randn(1, 5, cfg.image_dim, generator=g),
                 "y": torch.randn(1, cfg.in_dim - 16, frames, h, w, generator=g)}
    return x, torch.tensor([700.0]), ctx, extra


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_json_round_trip(name):
    cfg = replace(CONFIGS[name], sinusoid_dtype="float32")
    assert WanConfig.from_diffusers_config(cfg.to_diffusers_config(), text_len=cfg.text_len) == cfg


@pytest.mark.parametrize("name", list(CONFIGS))
def test_saved_as_diffusers_loads_and_matches(name, tmp_path):
    cfg = replace(CONFIGS[name], sinusoid_dtype="float32")   # diffusers computes the sinusoid in float32
    native = _random_model(cfg)
    folder = save_diffusers(native, tmp_path / name)
    node = _node(folder, cfg.text_len)
    loaded = node.require_model()
    assert loaded.cfg == cfg, "every size, eps and the sinusoid dtype come from config.json"
    x, t, ctx, extra = _inputs(cfg)
    with torch.no_grad():
        ref, got = native(x, t, [ctx[0]], **extra), loaded(x, t, [ctx[0]], **extra)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    if cfg.model_type == "t2v":   # the causal path too: one block through a fresh cache each
        xb = x.transpose(1, 2)
        outs = []
        for m in (native, loaded):
            cache = SelfKVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim, (6 // 2) * (10 // 2), max_frames=3)
            with torch.no_grad():
                outs.append(m.forward_causal(xb, torch.full((1, 3), 500.0), m.prepare_cross([ctx[0]]), cache, 0))
        torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def test_wrong_heads_or_eps_would_change_the_output():
    """The config values read matter: 3 heads vs 1, eps 1e-5 vs 1e-6 give other numbers (so a loader that
    ignored them could not pass the test above)."""
    cfg = replace(CONFIGS["t2v_3x32"], sinusoid_dtype="float32")
    native = _random_model(cfg)
    x, t, ctx, _ = _inputs(cfg)
    with torch.no_grad():
        ref = native(x, t, [ctx[0]])
        for other in (replace(cfg, num_heads=1), replace(cfg, eps=1e-6), replace(cfg, sinusoid_dtype="float64")):
            m = WanDiT(other).eval()
            m.load_state_dict(native.state_dict())
            assert not torch.equal(m(x, t, [ctx[0]]), ref), other


def test_no_config_json_and_no_heads_is_an_error_not_a_zero_division(tmp_path):
    cfg = CONFIGS["t2v_4x8_noqk"]
    folder = save_diffusers(_random_model(cfg), tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="num_heads"):
        _node(folder, cfg.text_len)
    node = _node(folder, cfg.text_len, num_heads=cfg.num_heads)   # said explicitly: fine
    assert node.require_model().cfg.num_heads == cfg.num_heads


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.pop("num_attention_heads"), "num_attention_heads"),
    (lambda d: d.update(num_layers=d["num_layers"] + 1), "num_layers"),
    (lambda d: d.update(attention_head_dim=d["attention_head_dim"] * 2), "dim"),
    (lambda d: d.update(qk_norm="rms_norm"), "qk_norm"),
])
def test_config_json_that_contradicts_the_weights_is_refused(tmp_path, edit, match):
    cfg = CONFIGS["t2v_3x32"]
    folder = save_diffusers(_random_model(cfg), tmp_path / "m")
    d = json.loads((folder / "config.json").read_text())
    edit(d)
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(FdError, match=match) as e:
        _node(folder, cfg.text_len)
    assert "config.json" in str(e.value)


def test_num_heads_param_that_contradicts_config_json_is_refused(tmp_path):
    cfg = CONFIGS["t2v_3x32"]
    folder = save_diffusers(_random_model(cfg), tmp_path / "m")
    with pytest.raises(FdError, match="num_heads"):
        _node(folder, cfg.text_len, num_heads=cfg.num_heads + 1)
