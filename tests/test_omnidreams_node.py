"""OmniDreams through what a user runs: specs -> plan -> session, ``omnidreams.dit`` -> ``ar.sampler``.

1. The `omnidreams_sv_dit` goldens (FD_GOLDENS) through the ``ar.sampler`` node: ``omnidreams.dit`` loads the
   case's checkpoint (net.* keys) and gets the first-frame latent, ``omnidreams.hdmap_file`` hands each block
   its HD-map latent, the sampler's params are the case's real config (steps warped with the shift, 2-frame
   chunks, window, no sink, context_noise). The node's ``torch.randn`` calls are replayed from the record
   (block noise before the block's re-noise and context draws: upstream's order; the recorded draws are in
   upstream's patchified layout and are un-patchified here). Every chunk's latent must match.
2. The tiny CPU spec streams past its window; bad HD-map input is a clear error.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import engine
from engine import Node, Param, Port, Registry
from engine.errors import FdError
from engine.types import LATENT, TEXT_EMBEDDING
from goldens import case_json, tensors, variant_params
from test_omnidreams_sv import CASE, to_frames

from nodes.cosmos.config import CosmosConfig
from nodes.samplers.flow_match import FlowMatchTable


class GoldenInputs(Node):
    type_name = "test.omnidreams_inputs"
    outputs = (Port("embeds", TEXT_EMBEDDING, "text embeddings [1, L, C]"),
               Port("image", LATENT, "first-frame latent [1, 1, C, H, W]"))
    params = (Param("path", str, "", "plain safetensors file"),)
    phase = "session"

    def run(self, inputs, state, step):
        from safetensors.torch import load_file
        t = load_file(self.p.path)
        return {"embeds": t["text_embeddings"][:, 0], "image": t["image_latent"][:, 0]}


class ReplayedRandn:
    """``torch`` for nodes.ar: 5-D randn requests get the next block noise, 4-D ones the next re-noise draw."""

    def __init__(self, noise: list[torch.Tensor], draws: list[torch.Tensor]):
        self.noise, self.draws, self.n, self.d = noise, draws, 0, 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn(self, *size, generator=None, device=None, dtype=None):
        size = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        if len(size) == 5:
            out, self.n = self.noise[self.n], self.n + 1
        else:
            out, self.d = self.draws[self.d], self.d + 1
        return out.reshape(size).clone()


@pytest.mark.parametrize("case,vname", variant_params([CASE]))
def test_golden_through_the_ar_sampler_node(case, vname, tmp_path, monkeypatch):
    cj = case_json(case)
    v = cj["variants"][vname]
    net, tr, real, sch = cj["network_config"], v["transformer"], cj["real_config"], v["schedule"]
    inp, rec = tensors(case, cj["inputs"]["file"]), tensors(case, v["record_file"])
    save_file({k: t.contiguous() for k, t in inp.items()}, str(tmp_path / "inputs.safetensors"))
    save_file(tensors(case, cj["weights"]["file"]), str(tmp_path / "dit.safetensors"))
    T, chunks = tr["len_t"], tr["chunks"]
    _, _, _, C, H, W = inp["image_latent"].shape
    assert FlowMatchTable(real["shift"]).warp(real["denoising_timesteps"]).tolist() == pytest.approx(
        sch["denoising_step_list"], rel=1e-7)
    hd = inp["hdmap.0"].shape[3]
    spec = {
        "name": "omnidreams_golden", "inputs": {"prompt": "unused"},
        "nodes": {
            "golden": {"type": "test.omnidreams_inputs", "params": {"path": str(tmp_path / "inputs.safetensors")},
                       "device": "cpu"},
            "hdmap": {"type": "omnidreams.hdmap_file", "device": "cpu",
                      "params": {"path": str(tmp_path / "inputs.safetensors"), "key": "hdmap.{block}",
                                 "frames": T, "channels": hd, "height": H, "width": W}},
            "dit": {"type": "omnidreams.dit", "in": {"image_latent": "golden.image"}, "device": "cpu",
                    "params": {"checkpoint": str(tmp_path / "dit.safetensors"), "dtype": "fp32",
                               "patch_spatial": net["patch_spatial"], "patch_temporal": net["patch_temporal"],
                               "concat_padding_mask": net["concat_padding_mask"],
                               "timestep_scale": net["timestep_scale"],
                               "rope_h_extrapolation_ratio": tr.get("h_extrapolation_ratio", 1.0),
                               "rope_w_extrapolation_ratio": tr.get("w_extrapolation_ratio", 1.0),
                               "rope_t_extrapolation_ratio": tr.get("t_extrapolation_ratio", 1.0)}},
            "sampler": {"type": "ar.sampler", "device": "cpu",
                        "in": {"model": "dit.model", "text": "golden.embeds", "hdmap": "hdmap.latent"},
                        "params": {"steps": real["denoising_timesteps"], "shift": float(real["shift"]),
                                   "frames_per_block": T, "window_frames": tr["window_size_t"],
                                   "sink_frames": tr["sink_size_t"], "context_noise": float(sch["context_noise"]),
                                   "latent_channels": C, "latent_height": H, "latent_width": W,
                                   "num_blocks": chunks}},
        },
        "sinks": {"latents": {"type": "sink.safetensors", "in": {"tensor": "sampler.latent"},
                              "params": {"path": str(tmp_path / "out.safetensors")}}},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    reg = Registry.default()
    reg.add(GoldenInputs)
    cfg = CosmosConfig(patch_spatial=net["patch_spatial"], patch_temporal=net["patch_temporal"], model_channels=48,
                       num_heads=3)
    draws = [to_frames(rec[f"draw.{k}"], cfg, T, H, W) for k in range(v["num_draws"])]
    per = v["num_draws"] // chunks
    rng = ReplayedRandn([d for k, d in enumerate(draws) if k % per == 0],
                        [d for k, d in enumerate(draws) if k % per])
    monkeypatch.setattr("nodes.ar.node.torch", rng)
    monkeypatch.setattr("nodes.ar.rollout.torch", rng)
    pipe = engine.load(path, registry=reg)
    tol = {k: v["tolerance"][k] for k in ("atol", "rtol")}
    with pipe.load().open_session() as s:
        for c in range(chunks):
            got = s.step().outputs["sampler"]["latent"]
            torch.testing.assert_close(got, rec[f"chunk.{c}.clean_latent"][:, 0], **tol,
                                       msg=lambda m: f"chunk {c}: {m}")
    assert (rng.n, rng.d) == (chunks, v["num_draws"] - chunks)


def test_tiny_spec_streams_past_its_window():
    pipe = engine.load("tiny_omnidreams", overrides=["inputs.num_blocks=5"])
    sp = pipe.plan.nodes["sampler"].params
    assert sp["num_blocks"] * sp["frames_per_block"] > sp["window_frames"]
    with pipe.load().open_session() as s:
        outs = [s.step().outputs for _ in range(sp["num_blocks"])]
    for o in outs:
        lat = o["sampler"]["latent"]
        assert lat.shape[:2] == (1, sp["frames_per_block"])
        assert lat.shape[3:] == (sp["latent_height"], sp["latent_width"])
        assert torch.isfinite(lat).all() and torch.isfinite(o["decoder"]["pixels"]).all()
    assert not torch.equal(outs[0]["sampler"]["latent"], outs[1]["sampler"]["latent"])


def test_hdmap_that_does_not_match_the_model_is_a_clear_error():
    pipe = engine.load("tiny_omnidreams", overrides=["nodes.hdmap.params.channels=8"])
    with pytest.raises((FdError, ValueError), match="HD-map channels"):
        with pipe.load().open_session() as s:
            s.step()


def test_hdmap_file_with_wrong_frames_is_a_clear_error(tmp_path):
    save_file({"hdmap.0": torch.zeros(1, 3, 16, 8, 12)}, str(tmp_path / "hd.safetensors"))
    spec = yaml.safe_load((Path(__file__).parents[1] / "specs" / "tiny_omnidreams.yaml").read_text())
    spec["nodes"]["hdmap"] = {"type": "omnidreams.hdmap_file", "device": "cpu", "params": {
        "path": str(tmp_path / "hd.safetensors"), "frames": 2, "channels": 16, "height": 8, "width": 12}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    pipe = engine.load(tmp_path / "spec.yaml")
    with pytest.raises(FdError, match=r"expected \[B, 2, 16, 8, 12\]"):
        with pipe.load().open_session() as s:
            s.step()


def test_tiny_multiview_spec_streams():
    pipe = engine.load("tiny_omnidreams_mv", overrides=["inputs.num_blocks=3"])
    sp = pipe.plan.nodes["sampler"].params
    views = pipe.plan.nodes["dit"].params["views"]
    assert sp["batch"] == len(views) > 1 and sp["num_blocks"] * sp["frames_per_block"] > sp["window_frames"]
    with pipe.load().open_session() as s:
        lats = [s.step().outputs["sampler"]["latent"] for _ in range(sp["num_blocks"])]
    assert all(t.shape[:2] == (len(views), sp["frames_per_block"]) and torch.isfinite(t).all() for t in lats)
    assert not torch.allclose(lats[-1][0], lats[-1][1])          # the views differ (view AdaLN terms, HD-maps)


def test_view_count_that_does_not_fit_is_a_clear_error():
    pipe = engine.load("tiny_omnidreams_mv", overrides=["nodes.sampler.params.batch=2",
                                                        "nodes.hdmap.params.batch=2"])
    with pytest.raises(FdError, match="not a multiple of the 3 views"):
        with pipe.load().open_session() as s:
            s.step()


def test_single_view_checkpoint_with_views_is_refused(tmp_path):
    cj = case_json(CASE)
    save_file(tensors(CASE, cj["weights"]["file"]), str(tmp_path / "dit.safetensors"))
    pipe = engine.load("tiny_omnidreams", overrides=[f"nodes.dit.params.checkpoint={tmp_path / 'dit.safetensors'}",
                                                     "nodes.dit.params.views=[camera_front_wide_120fov]"])
    with pytest.raises(FdError, match="single-view checkpoint but the spec sets 1 views"):
        pipe.load()


def test_snapshot_restores_the_windowed_cache():
    """Blocks after a restore equal the blocks the uninterrupted session made (cache rows, RNG, block index)."""
    pipe = engine.load("tiny_omnidreams", overrides=["inputs.num_blocks=5"]).load()
    with pipe.open_session() as s:
        for _ in range(3):                                  # the 6-frame window is full; later blocks evict
            s.step()
        snap = s.snapshot()
        ref = [s.step().outputs["sampler"]["latent"] for _ in range(2)]
    with pipe.open_session() as s:
        s.restore(snap)
        got = [s.step().outputs["sampler"]["latent"] for _ in range(2)]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
