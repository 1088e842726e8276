"""Shared loading for the causal Wan 2.2 (two experts) parity tests: every size from the case files."""
from __future__ import annotations

import json

import torch
from goldens import case_dir, case_json, tensors

from nodes.ar.schedule import ARSchedule
from nodes.checkpoint import open_checkpoint
from nodes.checkpoint.wan_layouts import to_native
from nodes.common.causal import StreamSpec
from nodes.samplers.flow_match import FlowMatchTable
from nodes.wan.causal import WanDenoiser
from nodes.wan.config import WanConfig
from nodes.wan.dit import WanDiT
from nodes.wan.moe import Wan22Experts

CASE = "causal_wan22_moe"
EXPERT_DIRS = {"high_noise": "transformer", "low_noise": "transformer_2"}


def load_expert(folder) -> WanDiT:
    """A diffusers-layout expert folder (config.json + safetensors) -> native WanDiT, strictly."""
    cj = json.loads((folder / "config.json").read_text())
    ckpt = to_native(open_checkpoint(folder))
    cfg = WanConfig.from_diffusers_config(cj, text_len=case_json(CASE)["model_kwargs"]["text_len"],
                                          where=str(folder / "config.json"))
    cfg.check_state_dict(ckpt, where=str(folder))
    model = WanDiT(cfg)
    model.load_state_dict({k: ckpt[k] for k in ckpt}, strict=True)
    return model.eval().requires_grad_(False)


def fv(cj: dict) -> dict:
    return cj["fastvideo_config_values"]


def experts(cross_attention: str = "shared_high") -> Wan22Experts:
    cj, d = case_json(CASE), case_dir(CASE)
    mods = {name: load_expert(d / sub) for name, sub in EXPERT_DIRS.items()}
    den = {n: WanDenoiser(m, m.cfg, torch.float32, "auto") for n, m in mods.items()}
    bound = fv(cj)["boundary_ratio"] * 1000.0
    return Wan22Experts(den["high_noise"], den["low_noise"], bound, cross_attention)


def schedule(cj: dict) -> ARSchedule:
    c = fv(cj)
    return ARSchedule.build(FlowMatchTable(c["flow_shift"]), c["dmd_denoising_steps"], warp=c["warp_denoising_step"],
                            context_noise=c["context_noise"], boundary_ratio=c["boundary_ratio"])


def open_stream(model: Wan22Experts, cj: dict, latents: torch.Tensor):
    """latents [B, C, T, H, W] (the record's layout)."""
    b, c, t, h, w = latents.shape
    window = fv(cj).get("sliding_window_num_frames")
    spec = StreamSpec(frame_shape=(c, h, w), frames_per_block=fv(cj)["num_frames_per_block"], batch=b,
                      sink_frames=fv(cj).get("sink_size", 0), window_frames=window, max_frames=t)
    return model.open_stream(spec)


def inputs_and_record():
    cj = case_json(CASE)
    return cj, tensors(CASE, cj["files"]["inputs"]), tensors(CASE, cj["files"]["record"])
