"""Against diffusers itself (a test extra: skipped without it): tiny non-release ``WanTransformer3DModel``
(T2V and I2V) and ``AutoencoderKLWan`` built and saved by diffusers (``save_pretrained``), loaded by our
``wan.dit`` / ``wan.vae_*`` nodes from the folder alone, and compared with diffusers' own forward in fp32
(1e-4 relative to the output's scale)."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from nodes.wan.node_dit import WanDiTNode  # noqa: E402
from nodes.wan.node_vae import WanVAEDecodeNode, WanVAEEncodeNode  # noqa: E402

DIFFUSERS_TEXT_LEN = 512   # diffusers' Wan I2V attention splits image tokens off at (context length - 512)
DIT_CONFIGS = {
    "t2v_3x32_l2": dict(num_attention_heads=3, attention_head_dim=32, in_channels=16, out_channels=16, text_dim=24,
                        freq_dim=64, ffn_dim=80, num_layers=2, eps=1e-5),
    "t2v_2x16_l3_eps1e-6": dict(num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
                                text_dim=20, freq_dim=32, ffn_dim=48, num_layers=3, eps=1e-6),
    "i2v_2x24_img40": dict(num_attention_heads=2, attention_head_dim=24, in_channels=36, out_channels=16,
                           text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, eps=1e-5, image_dim=40,
                           added_kv_proj_dim=48),
}
VAE_CONFIGS = {
    "base8_z4_mult122_res1": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                  temperal_downsample=[False, True]),
    "base12_z16_mult1224": dict(base_dim=12, z_dim=16, dim_mult=[1, 2, 2, 4], num_res_blocks=2,
                                temperal_downsample=[False, True, True]),
}


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def _close(mine, ref, what):
    scale = ref.abs().max().item()
    torch.testing.assert_close(mine, ref, atol=1e-4 * scale, rtol=1e-4, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_wan_transformer_matches_diffusers(name, tmp_path):
    kw = DIT_CONFIGS[name]
    torch.manual_seed(0)
    ref = _perturb(diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), **kw), 1)
    ref.save_pretrained(tmp_path / "transformer")
    node = WanDiTNode("dit", {"checkpoint": str(tmp_path / "transformer"), "text_len": DIFFUSERS_TEXT_LEN,
                              "dtype": "fp32"}, "cpu")
    node.load()
    mine = node.require_model()
    g = torch.Generator().manual_seed(2)
    f, h, w = 3, 6, 10                                      # H != W, odd token grid
    x = torch.randn(1, 16, f, h, w, generator=g)
    ctx = torch.randn(1, DIFFUSERS_TEXT_LEN, kw["text_dim"], generator=g)
    t = torch.tensor([737.5])
    extra, inp = {}, x
    if "image_dim" in kw:
        y = torch.randn(1, kw["in_channels"] - 16, f, h, w, generator=g)
        img = torch.randn(1, 7, kw["image_dim"], generator=g)
        extra, inp = {"clip_fea": img, "y": y}, torch.cat([x, y], dim=1)
    with torch.no_grad():
        want = ref(inp, t, ctx, encoder_hidden_states_image=extra.get("clip_fea"), return_dict=False)[0]
        got = mine(x, t, [ctx[0]], **extra)
    _close(got, want.float(), f"{name} forward")


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_wan_vae_matches_diffusers(name, tmp_path):
    kw = VAE_CONFIGS[name]
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(kw["z_dim"], generator=g).tolist()
    std = (torch.rand(kw["z_dim"], generator=g) + 0.5).tolist()
    torch.manual_seed(0)
    ref = _perturb(diffusers.AutoencoderKLWan(latents_mean=mean, latents_std=std, **kw), 4)
    ref.save_pretrained(tmp_path / "vae")
    dec = WanVAEDecodeNode("dec", {"checkpoint": str(tmp_path / "vae"), "dtype": "fp32", "channels_last": False},
                           "cpu")
    dec.load()
    sf = 2 ** (len(kw["dim_mult"]) - 1)
    lat = torch.randn(1, kw["z_dim"], 4, 3, 5, generator=g)           # normalised latents, h != w
    m, s = torch.tensor(mean).view(1, -1, 1, 1, 1), torch.tensor(std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        want = ref.decode(lat * s + m, return_dict=False)[0]           # the pipeline de-normalises first
    state, frames = dec.new_state(), []
    for b, (a, e) in enumerate([(0, 1), (1, 4)]):                      # streaming: 1 latent frame, then 3
        step = type("S", (), {"block": b})()
        frames.append(dec.run({"latent": lat[:, :, a:e].transpose(1, 2)}, state, step)["pixels"])
    _close(torch.cat(frames, dim=1).transpose(1, 2), want, f"{name} streaming decode")
    enc = WanVAEEncodeNode("enc", {"checkpoint": str(tmp_path / "vae"), "dtype": "fp32", "channels_last": False,
                                   "mode": "image"}, "cpu")
    enc.load()
    img = torch.rand(1, 3, 3 * sf, 5 * sf, generator=g) * 2 - 1
    with torch.no_grad():
        mu = ref.encode(img[:, :, None]).latent_dist.mode()
    got = enc.run({"image": img}, enc.new_state(), type("S", (), {"block": 0})())["latent"]
    _close(got.transpose(1, 2), (mu - m) / s, f"{name} encode (normalised with the config's statistics)")
