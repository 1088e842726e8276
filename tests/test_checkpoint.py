"""Checkpoint resolution, reading, key layouts and meta-device loading.

Tiny checkpoints are written to tmp dirs from the Wan golden weights in every
layout fd must read; each must come back as exactly the native state dict.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from goldens import case_json, tensors
from nodes.checkpoint import (CheckpointError, apply, invert, keymap, load_into, open_checkpoint,
                              parse_hf_ref, random_init, read_state_dict, resolve)
from nodes.checkpoint import wan_layouts as W

DIT_CASES = ["wan_t2v_dit", "wan_i2v_dit"]


def native_sd(case: str) -> dict[str, torch.Tensor]:
    return tensors(case, "diffusion_pytorch_model.safetensors")


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def save_shards(sd: dict, folder: Path, stem: str, n: int) -> Path:
    """Write ``sd`` as ``n`` safetensors shards plus a diffusers-style index; return the index path."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    weight_map = {}
    for i in range(n):
        name = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        part = keys[i::n]
        save_file({k: sd[k].contiguous() for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    index = folder / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


# ------------------------------------------------------------------ keymaps

def test_rules_match_whole_components_with_placeholders_and_drops():
    km = keymap("t", [("blocks.{i}.attn.to_q", "blocks.{i}.q"), ("blocks.{i}.junk", None), ("top", "head.top")])
    assert km.rename("blocks.12.attn.to_q.weight") == "blocks.12.q.weight"
    assert km.rename("blocks.1.attn.to_qkv.weight") == "blocks.1.attn.to_qkv.weight"  # not a whole component
    assert km.rename("blocks.3.junk.weight") is None
    assert km.rename("top") == "head.top" and km.rename("x.top.weight") == "x.top.weight"  # anchored at start
    sd = {"blocks.0.attn.to_q.weight": torch.zeros(1), "blocks.0.junk": torch.ones(1), "other": torch.ones(2)}
    out = apply(km, sd)
    assert sorted(out) == ["blocks.0.q.weight", "other"] and out["other"] is sd["other"]


def test_first_rule_wins_so_swaps_need_no_placeholder():
    km = keymap("swap", [("n.{i}.norm2", "n.{i}.norm3"), ("n.{i}.norm3", "n.{i}.norm2")])
    assert km.rename("n.0.norm2.weight") == "n.0.norm3.weight"
    assert km.rename("n.0.norm3.bias") == "n.0.norm2.bias"
    inv = invert(km)
    for k in ("n.4.norm2.weight", "n.4.norm3.bias", "n.4.other"):
        assert inv.rename(km.rename(k)) == k


def test_keymap_collisions_and_bad_rules_are_errors():
    km = keymap("c", [("a", "b")])
    with pytest.raises(CheckpointError, match="maps both 'a.w' and 'b.w' to 'b.w'"):
        km.rename_keys(["a.w", "b.w"])
    with pytest.raises(ValueError, match="not in the pattern"):
        keymap("bad", [("x.{i}", "y.{j}")])
    with pytest.raises(ValueError, match="cannot be inverted"):
        invert(keymap("lossy", [("x.{i}.{j}", "y.{i}")]))


# ------------------------------------------------------------------ Wan layouts

@pytest.mark.parametrize("case", DIT_CASES)
def test_wan_dit_diffusers_map_round_trips_and_uses_diffusers_names(case):
    sd = native_sd(case)
    diff = apply(W.DIT_NATIVE_TO_DIFFUSERS, sd)
    assert len(diff) == len(sd)
    back = apply(W.DIT_DIFFUSERS_TO_NATIVE, diff)
    assert_same(back, sd)
    # names from diffusers transformer_wan.py (pure renames, shapes untouched)
    n = sum(k.startswith("blocks.") and k.endswith(".modulation") for k in sd)
    expected = {
        "condition_embedder.time_embedder.linear_1.weight": "time_embedding.0.weight",
        "condition_embedder.time_embedder.linear_2.bias": "time_embedding.2.bias",
        "condition_embedder.time_proj.weight": "time_projection.1.weight",
        "condition_embedder.text_embedder.linear_1.weight": "text_embedding.0.weight",
        "condition_embedder.text_embedder.linear_2.weight": "text_embedding.2.weight",
        "scale_shift_table": "head.modulation", "proj_out.weight": "head.head.weight",
        "patch_embedding.weight": "patch_embedding.weight",
    }
    for i in range(n):
        expected.update({
            f"blocks.{i}.attn1.to_q.weight": f"blocks.{i}.self_attn.q.weight",
            f"blocks.{i}.attn1.to_out.0.bias": f"blocks.{i}.self_attn.o.bias",
            f"blocks.{i}.attn1.norm_k.weight": f"blocks.{i}.self_attn.norm_k.weight",
            f"blocks.{i}.attn2.to_v.weight": f"blocks.{i}.cross_attn.v.weight",
            f"blocks.{i}.attn2.norm_q.weight": f"blocks.{i}.cross_attn.norm_q.weight",
            f"blocks.{i}.norm2.weight": f"blocks.{i}.norm3.weight",
            f"blocks.{i}.ffn.net.0.proj.weight": f"blocks.{i}.ffn.0.weight",
            f"blocks.{i}.ffn.net.2.bias": f"blocks.{i}.ffn.2.bias",
            f"blocks.{i}.scale_shift_table": f"blocks.{i}.modulation",
        })
        if f"blocks.{i}.cross_attn.k_img.weight" in sd:
            expected.update({
                f"blocks.{i}.attn2.add_k_proj.weight": f"blocks.{i}.cross_attn.k_img.weight",
                f"blocks.{i}.attn2.add_v_proj.bias": f"blocks.{i}.cross_attn.v_img.bias",
                f"blocks.{i}.attn2.norm_added_k.weight": f"blocks.{i}.cross_attn.norm_k_img.weight",
            })
    if "img_emb.proj.1.weight" in sd:
        expected.update({f"condition_embedder.image_embedder.{d}.weight": f"img_emb.proj.{p}.weight" for d, p in
                         [("norm1", 0), ("ff.net.0.proj", 1), ("ff.net.2", 3), ("norm2", 4)]})
    for d, nat in expected.items():
        assert diff[d] is sd[nat], (d, nat)
    native_words = ("self_attn", "cross_attn", "time_embedding", "norm3", "head.")
    leftovers = [k for k in diff if any(t in k for t in native_words)]
    assert leftovers == []


def test_wan_dit_drops_norm_added_q_and_knows_flf2v_pos_embed():
    assert W.DIT_DIFFUSERS_TO_NATIVE.rename("blocks.7.attn2.norm_added_q.weight") is None
    assert W.DIT_DIFFUSERS_TO_NATIVE.rename("condition_embedder.image_embedder.pos_embed") == "img_emb.emb_pos"


@pytest.mark.parametrize("case", DIT_CASES)
def test_detect_layout_and_to_native(case):
    sd = native_sd(case)
    diff = apply(W.DIT_NATIVE_TO_DIFFUSERS, sd)
    prefixed = {"model." + k: v for k, v in sd.items()}
    other = {k: v + 1 for k, v in prefixed.items()}
    assert W.detect_layout(sd) == "native"
    assert W.detect_layout(diff) == "diffusers"
    assert W.detect_layout(prefixed) == "self_forcing"
    assert W.detect_layout({"generator": 0, "generator_ema": 0}) == "self_forcing"
    assert_same(W.to_native(sd), sd)
    assert_same(W.to_native(diff), sd)
    assert_same(W.to_native(prefixed), sd)
    assert_same(W.to_native({"generator": other, "generator_ema": prefixed}), sd)
    assert_same(W.to_native({"generator": prefixed, "generator_ema": other}, ema=False), sd)
    with pytest.raises(CheckpointError, match="no known Wan DiT layout"):
        W.detect_layout(["foo.weight"])
    fused = dict(diff, **{"blocks.0.attn1.to_qkv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="fused"):
        W.to_native(fused)


def test_wan_vae_diffusers_map_round_trips():
    kw = case_json("wan_vae").get("model_kwargs", {})
    km = W.wan21_vae_keymap(kw.get("num_res_blocks", 2), len(kw.get("dim_mult", [1, 2, 4, 4])))
    sd = tensors("wan_vae", "Wan2.1_VAE.safetensors")
    diff = apply(invert(km), sd)
    assert len(diff) == len(sd)
    assert_same(apply(km, diff), sd)
    native_words = (".residual.", ".downsamples.", ".upsamples.", ".middle.", ".head.", ".shortcut.")
    assert [k for k in diff if any(w in "." + k for w in native_words) or k.startswith(("conv1", "conv2"))] == []
    # names from diffusers autoencoder_kl_wan.py (WanEncoder3d / WanDecoder3d / AutoencoderKLWan)
    for d, nat in [("quant_conv.weight", "conv1.weight"), ("post_quant_conv.bias", "conv2.bias"),
                   ("encoder.conv_in.weight", "encoder.conv1.weight"),
                   ("encoder.mid_block.attentions.0.to_qkv.weight", "encoder.middle.1.to_qkv.weight"),
                   ("encoder.mid_block.resnets.1.norm2.gamma", "encoder.middle.2.residual.3.gamma"),
                   ("decoder.norm_out.gamma", "decoder.head.0.gamma"),
                   ("decoder.up_blocks.0.resnets.0.conv1.weight", "decoder.upsamples.0.residual.2.weight")]:
        assert diff[d] is sd[nat]
    first_resample = f"decoder.upsamples.{kw.get('num_res_blocks', 2) + 1}"  # after the stage's res blocks
    up = [k for k in sd if k.startswith(first_resample + ".")]
    assert up
    for k in up:
        assert diff[k.replace(first_resample, "decoder.up_blocks.0.upsamplers.0")] is sd[k]


# ------------------------------------------------------------------ reading files

@pytest.mark.parametrize("case", DIT_CASES)
def test_every_file_layout_reads_back_the_native_state_dict(case, tmp_path):
    sd = native_sd(case)
    diff = apply(W.DIT_NATIVE_TO_DIFFUSERS, sd)

    save_file(sd, str(tmp_path / "native.safetensors"))
    assert_same(read_state_dict(tmp_path / "native.safetensors"), sd)

    save_file(dict(diff), str(tmp_path / "diffusers.safetensors"))
    assert_same(W.to_native(read_state_dict(tmp_path / "diffusers.safetensors")), sd)

    index = save_shards(dict(diff), tmp_path / "transformer", "diffusion_pytorch_model", 3)
    assert_same(W.to_native(read_state_dict(index)), sd)
    assert_same(W.to_native(read_state_dict(index.parent)), sd)  # folder: finds the index
    shards = sorted(index.parent.glob("*.safetensors"))
    assert_same(W.to_native(read_state_dict(shards)), sd)       # explicit list of shards

    torch.save(sd, tmp_path / "model.pth")
    assert_same(read_state_dict(tmp_path / "model.pth"), sd)

    prefixed = {"model." + k: v for k, v in sd.items()}
    other = {k: torch.zeros_like(v) for k, v in prefixed.items()}
    torch.save({"generator": other, "generator_ema": prefixed}, tmp_path / "self_forcing_dmd.pt")
    assert_same(read_state_dict(tmp_path / "self_forcing_dmd.pt", select="generator_ema", strip_prefix="model."), sd)
    with pytest.raises(CheckpointError, match="select="):
        read_state_dict(tmp_path / "self_forcing_dmd.pt")
    with pytest.raises(CheckpointError, match="no entry 'ema'"):
        read_state_dict(tmp_path / "self_forcing_dmd.pt", select="ema")
    whole = torch.load(tmp_path / "self_forcing_dmd.pt", weights_only=True)
    assert_same(W.to_native(whole), sd)


def test_read_state_dict_casts_floats_only_and_reports_bad_files(tmp_path):
    sd = {"w": torch.randn(3, 4), "step": torch.tensor([7], dtype=torch.int64)}
    save_file(sd, str(tmp_path / "a.safetensors"))
    out = read_state_dict(tmp_path / "a.safetensors", dtype=torch.bfloat16)
    assert out["w"].dtype == torch.bfloat16 and torch.equal(out["w"], sd["w"].bfloat16())
    assert out["step"].dtype == torch.int64 and torch.equal(out["step"], sd["step"])
    ckpt = open_checkpoint(tmp_path / "a.safetensors")
    assert ckpt.shape("w") == (3, 4) and ckpt.dtype("w") == torch.float32 and len(ckpt) == 2
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        read_state_dict(tmp_path / "model.txt")
    with pytest.raises(CheckpointError, match="strip_prefix='model.'"):
        read_state_dict(tmp_path / "a.safetensors", strip_prefix="model.")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match="key 'w' is in both"):
        read_state_dict([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])


# ------------------------------------------------------------------ loading into modules

class Tiny(nn.Module):
    """Two Linear layers and a RoPE-like table that checkpoints do not store."""

    def __init__(self, d_in=6, d_hidden=8, d_out=4):
        super().__init__()
        self.inp = nn.Linear(d_in, d_hidden)
        self.out = nn.Linear(d_hidden, d_out, bias=False)
        self.register_buffer("table", torch.empty(d_hidden), persistent=False)
        self.hook_calls = 0

    def init_non_persistent(self, device):
        self.hook_calls += 1
        self.table = torch.arange(self.inp.out_features, device=device, dtype=torch.float64) / 10


class NoHook(Tiny):
    init_non_persistent = None


def tiny_sd(seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    with torch.device("cpu"):
        m = Tiny(**kw)
    return {k: torch.randn(v.shape, generator=g) for k, v in m.state_dict().items()}


def test_load_into_meta_module_converts_device_and_dtype(tmp_path):
    sd = tiny_sd()
    with torch.device("meta"):
        model = Tiny()
    out = load_into(model, sd, device="cpu", dtype=torch.float64)
    assert out is model and model.hook_calls == 1
    for k, v in sd.items():
        got = model.state_dict()[k]
        assert got.dtype == torch.float64 and got.device.type == "cpu" and torch.equal(got, v.double())
    assert torch.equal(model.table, torch.arange(8, dtype=torch.float64) / 10)
    # a factory is built on meta; dtype=None keeps the module's declared dtype; lazy safetensors source
    save_file({k: v.half() for k, v in sd.items()}, str(tmp_path / "t.safetensors"))
    m2 = load_into(Tiny, open_checkpoint(tmp_path / "t.safetensors"))
    assert m2.inp.weight.dtype == torch.float32 and torch.equal(m2.inp.weight, sd["inp.weight"].half().float())
    assert m2.table.device.type == "cpu" and not any(t.is_meta for t in m2.state_dict().values())


def test_load_into_with_keymap_and_missing_hook_is_reported():
    sd = {("first" + k[3:] if k.startswith("inp") else k): v for k, v in tiny_sd().items()}
    km = keymap("tiny", [("first", "inp")])
    m = load_into(Tiny, sd, keymap=km)
    assert torch.equal(m.inp.bias, sd["first.bias"])
    with pytest.raises(CheckpointError, match=r"still on the meta device.*table.*init_non_persistent"):
        load_into(NoHook, tiny_sd())


def test_load_errors_list_missing_unexpected_and_mismatched_keys():
    sd = tiny_sd()
    bad = dict(sd)
    bad.pop("inp.bias")
    bad["extra.weight"] = torch.zeros(2)
    bad["out.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as e:
        load_into(Tiny, bad)
    msg = str(e.value)
    assert "1 missing, 1 unexpected, 1 shape-mismatched" in msg
    assert "missing" in msg and "inp.bias" in msg
    assert "extra.weight" in msg
    assert "out.weight [3, 3] vs [4, 8]" in msg
    # strict=False tolerates unexpected keys but not parameters left on meta
    ok = dict(sd, **{"extra.weight": torch.zeros(2)})
    load_into(Tiny, ok, strict=False)
    with pytest.raises(CheckpointError, match="inp.bias"):
        load_into(Tiny, {k: v for k, v in sd.items() if k != "inp.bias"}, strict=False)


def test_names_and_shapes_are_checked_before_any_tensor_is_read(tmp_path, monkeypatch):
    from nodes.checkpoint import load as load_mod
    sd = tiny_sd()
    sd["out.weight"] = torch.zeros(4, 9)
    save_file(sd, str(tmp_path / "t.safetensors"))
    ckpt = open_checkpoint(tmp_path / "t.safetensors")

    def no_read(self):
        raise AssertionError("tensor read before the fit check")
    monkeypatch.setattr(load_mod._Entry, "read", no_read)
    with pytest.raises(CheckpointError, match=r"out.weight \[4, 9\] vs \[4, 8\]"):
        load_into(Tiny, ckpt)


def test_load_errors_truncate_long_lists_and_hint_prefixes():
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(12))
    sd = {"model." + k: v for k, v in Wide().state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        load_into(Wide, sd)
    msg = str(e.value)
    assert "24 missing" in msg and "... and 14 more" in msg
    assert "strip_prefix='model.'" in msg


@pytest.mark.parametrize("case", DIT_CASES)
def test_wrong_layout_error_hints_the_wan_keymap(case):
    sd = native_sd(case)

    class Holder(nn.Module):  # a module with the native Wan names and shapes, without the model code
        def __init__(self):
            super().__init__()
            for k, v in sd.items():
                self.register_parameter(k.replace(".", "__"), nn.Parameter(torch.empty_like(v)))

        def state_dict(self, *a, **kw):
            return {k.replace("__", "."): v for k, v in super().state_dict(*a, **kw).items()}

    diff = apply(W.DIT_NATIVE_TO_DIFFUSERS, sd)
    with pytest.raises(CheckpointError, match="DIT_DIFFUSERS_TO_NATIVE"):
        load_into(Holder(), diff)


# ------------------------------------------------------------------ the Wan DiT itself

@pytest.mark.parametrize("case", DIT_CASES)
def test_diffusers_and_self_forcing_checkpoints_load_strictly_into_wan_dit(case, tmp_path):
    dit = pytest.importorskip("nodes.wan.dit")
    from nodes.wan.config import WanConfig
    cfg = WanConfig.from_config_json(case_json(case)["model_kwargs"])
    sd = native_sd(case)

    index = save_shards(dict(apply(W.DIT_NATIVE_TO_DIFFUSERS, sd)), tmp_path / "transformer",
                        "diffusion_pytorch_model", 2)
    model = load_into(lambda: dit.WanDiT(cfg), open_checkpoint(index.parent), keymap=W.DIT_DIFFUSERS_TO_NATIVE)
    assert_same(model.state_dict(), sd)

    torch.save({"generator": {"model." + k: v for k, v in sd.items()}}, tmp_path / "sf.pt")
    ckpt = open_checkpoint(tmp_path / "sf.pt", select="generator")
    model = load_into(lambda: dit.WanDiT(cfg), W.to_native(ckpt), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.equal(model.head.head.weight, sd["head.head.weight"].bfloat16())


# ------------------------------------------------------------------ random weights

def test_random_init_is_deterministic_and_scaled():
    def build():
        with torch.device("meta"):
            return Tiny(d_in=256, d_hidden=64, d_out=32)
    a, b, c = random_init(build(), 3), random_init(build(), 3), random_init(build(), 4)
    assert a.hook_calls == 1 and torch.equal(a.table, torch.arange(64, dtype=torch.float64) / 10)
    for k in a.state_dict():
        assert torch.equal(a.state_dict()[k], b.state_dict()[k]), k
    assert not torch.equal(a.inp.weight, c.inp.weight)
    assert abs(a.inp.weight.std().item() * 16 - 1) < 0.1      # N / sqrt(fan_in=256)
    assert abs(a.inp.bias.std().item() - 0.05) < 0.03
    norm = random_init(nn.LayerNorm(512), 0)
    assert abs(norm.weight.mean().item() - 1) < 0.03 and abs(norm.weight.std().item() - 0.1) < 0.02
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.modulation = nn.Parameter(torch.empty(1, 6, 400))
    assert abs(random_init(Raw(), 0).modulation.std().item() * 20 - 1) < 0.1  # N / sqrt(last dim)
    half = random_init(build(), 3, dtype=torch.bfloat16)
    assert half.inp.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------ resolving references

def test_parse_hf_ref_forms():
    r = parse_hf_ref("hf://Wan-AI/Wan2.1-T2V-1.3B/sub/diffusion_pytorch_model.safetensors")
    assert (r.repo_id, r.path, r.revision, r.repo_type) == (
        "Wan-AI/Wan2.1-T2V-1.3B", "sub/diffusion_pytorch_model.safetensors", None, "model")
    assert parse_hf_ref("hf://o/r/f.pt@refs/pr/3").revision == "refs/pr/3"
    r = parse_hf_ref("hf://o/r@v2/f.pt")
    assert (r.repo_id, r.path, r.revision) == ("o/r", "f.pt", "v2")
    r = parse_hf_ref("hf://datasets/o/r")
    assert (r.repo_id, r.path, r.repo_type) == ("o/r", "", "dataset") and str(r) == "hf://datasets/o/r"
    with pytest.raises(CheckpointError, match="expected hf://org/repo"):
        parse_hf_ref("hf://justone")


def test_resolve_local_paths(tmp_path, monkeypatch):
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"x")
    (tmp_path / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"x")
    assert resolve(str(tmp_path / "Wan2.1_VAE.pth")) == tmp_path / "Wan2.1_VAE.pth"
    assert resolve(tmp_path, kind="folder") == tmp_path
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve("~/Wan2.1_VAE.pth") == tmp_path / "Wan2.1_VAE.pth"
    with pytest.raises(CheckpointError, match=r"Wan2\.1_VAE\.pt: not found; closest in .*Wan2\.1_VAE\.pth"):
        resolve(tmp_path / "Wan2.1_VAE.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve(tmp_path / "nope" / "deeper" / "x.pth")
    with pytest.raises(CheckpointError, match="expected a file, found a folder"):
        resolve(tmp_path)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty HF_HOME in offline mode: huggingface_hub may not touch the network."""
    import huggingface_hub.constants as hc
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf" / "hub"


def cache_file(hub: Path, repo: str, path: str, data: bytes, commit: str = "a" * 40, ref: str = "main") -> Path:
    """Lay out a file as huggingface_hub's cache stores it."""
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    f = repo_dir / "snapshots" / commit / path
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data)
    return f


def test_resolve_hf_offline_missing_file_says_how_to_get_it(offline_hub):
    with pytest.raises(CheckpointError) as e:
        resolve("hf://Wan-AI/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth")
    msg = str(e.value)
    assert "Wan2.1_VAE.pth" in msg and "Wan-AI/Wan2.1-T2V-1.3B" in msg
    assert "hf download Wan-AI/Wan2.1-T2V-1.3B Wan2.1_VAE.pth" in msg
    assert "HF_HUB_OFFLINE" in msg and str(offline_hub) in msg
    with pytest.raises(CheckpointError, match="--revision v1"):
        resolve("hf://o/r/x.safetensors@v1")
    with pytest.raises(CheckpointError, match=r"hf download o/r --include 'transformer/\*'"):
        resolve("hf://o/r/transformer", kind="folder")


def test_resolve_hf_offline_uses_the_cache(offline_hub, tmp_path):
    sd = {"w": torch.arange(4.0)}
    f = cache_file(offline_hub, "org/tiny", "transformer/diffusion_pytorch_model.safetensors", b"")
    save_file(sd, str(f))
    got = resolve("hf://org/tiny/transformer/diffusion_pytorch_model.safetensors")
    assert got.read_bytes() == f.read_bytes()
    assert resolve("hf://org/tiny", kind="folder") == f.parent.parent
    assert resolve("hf://org/tiny/transformer", kind="folder") == f.parent
    assert_same(read_state_dict("hf://org/tiny/transformer/diffusion_pytorch_model.safetensors"), sd)
    assert_same(read_state_dict("hf://org/tiny/transformer"), sd)
    with pytest.raises(CheckpointError, match="names a whole repo"):
        resolve("hf://org/tiny")
