"""The Wan VAE nodes read a diffusers ``AutoencoderKLWan`` folder of non-release sizes from its config.json
(base_dim, z_dim, dim_mult, num_res_blocks, temperal_downsample) and use its latents_mean / latents_std;
the loaded VAE (full and streaming decode, encode) matches the native one it was saved from."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import FdError
from nodes.checkpoint.keymaps import apply, invert
from nodes.checkpoint.wan_layouts import wan21_vae_keymap
from nodes.wan.node_vae import WanVAEDecodeNode, WanVAEEncodeNode
from nodes.wan.vae import WanVAE

CONFIGS = {
    "base8_z4_mult122_res1": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                  temperal_downsample=[False, True]),
    "base12_z6_mult1224_res2": dict(base_dim=12, z_dim=6, dim_mult=[1, 2, 2, 4], num_res_blocks=2,
                                    temperal_downsample=[False, True, True]),
}


def _native(d: dict, seed: int = 0) -> WanVAE:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    vae = WanVAE(dim=d["base_dim"], z_dim=d["z_dim"], dim_mult=d["dim_mult"], num_res_blocks=d["num_res_blocks"],
                 temperal_downsample=d["temperal_downsample"],
                 latent_mean=torch.randn(d["z_dim"], generator=g).tolist(),
                 latent_std=(torch.rand(d["z_dim"], generator=g) + 0.5).tolist())
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vae.eval()


def save_diffusers_vae(vae: WanVAE, d: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": "AutoencoderKLWan", "attn_scales": [], "dropout": 0.0, **d,
           "latents_mean": vae.latent_mean.tolist(), "latents_std": vae.latent_std.tolist()}
    (folder / "config.json").write_text(json.dumps(cfg))
    km = invert(wan21_vae_keymap(d["num_res_blocks"], len(d["dim_mult"])), "native -> diffusers")
    sd = {k: v.contiguous() for k, v in apply(km, vae.state_dict()).items()}
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def _node(cls, folder: Path, **params):
    node = cls("vae", {"checkpoint": str(folder), "dtype": "fp32", "channels_last": False, **params}, "cpu")
    node.load()
    return node


class _Step:
    def __init__(self, block):
        self.block = block


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_vae_of_other_sizes_loads_and_matches(name, tmp_path):
    d = CONFIGS[name]
    native = _native(d)
    folder = save_diffusers_vae(native, d, tmp_path / name)
    node = _node(WanVAEDecodeNode, folder)
    vae = node.require_model()
    torch.testing.assert_close(vae.latent_mean, native.latent_mean)   # from config.json, not Wan 2.1's
    torch.testing.assert_close(vae.latent_std, native.latent_std)
    assert vae.temporal_factor == native.temporal_factor and vae.spatial_factor == native.spatial_factor
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(1, d["z_dim"], 4, 3, 5, generator=g)          # [B, z, F, h, w], h != w
    ref = native.decode(lat, clamp=True)
    torch.testing.assert_close(vae.decode(lat, clamp=True), ref, atol=1e-5, rtol=1e-5)
    state, frames = node.new_state(), []                              # streaming: blocks of 1 then 3 frames
    for b, (s, e) in enumerate([(0, 1), (1, 4)]):
        frames.append(node.run({"latent": lat[:, :, s:e].transpose(1, 2)}, state, _Step(b))["pixels"])
    torch.testing.assert_close(torch.cat(frames, dim=1).transpose(1, 2), ref, atol=1e-5, rtol=1e-5)
    enc = _node(WanVAEEncodeNode, folder, mode="image")
    img = torch.rand(1, 3, 3 * native.spatial_factor, 5 * native.spatial_factor, generator=g) * 2 - 1
    got = enc.run({"image": img}, enc.new_state(), _Step(0))["latent"]
    torch.testing.assert_close(got.transpose(1, 2), native.encode(img[:, :, None]), atol=1e-5, rtol=1e-5)


def test_vae_config_missing_a_size_is_refused(tmp_path):
    d = CONFIGS["base8_z4_mult122_res1"]
    folder = save_diffusers_vae(_native(d), d, tmp_path / "v")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("dim_mult")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FdError, match="dim_mult"):
        _node(WanVAEDecodeNode, folder)


def test_other_z_dim_without_latent_stats_is_refused(tmp_path):
    d = CONFIGS["base8_z4_mult122_res1"]
    folder = save_diffusers_vae(_native(d), d, tmp_path / "v")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["latents_mean"], cfg["latents_std"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FdError, match="latents_mean"):
        _node(WanVAEDecodeNode, folder)
