"""The causal Wan 2.2 family through the engine: the tiny `causal_wan22` spec end to end, the golden's
diffusers experts through `wan.dit`'s own loader (config.json), and the bad inputs refused before any
weight is read (missing expert folder, experts of different sizes, boundary outside (0, 1))."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from goldens import case_dir
from safetensors.torch import save_file
from wan22_case import CASE, EXPERT_DIRS, fv, inputs_and_record, open_stream, schedule

import engine
from engine.errors import FdError
from nodes.ar.rollout import ARRollout
from nodes.ar.schedule import ARSchedule
from nodes.checkpoint.keymaps import apply
from nodes.checkpoint.wan_layouts import DIT_NATIVE_TO_DIFFUSERS
from nodes.common.causal import StreamSpec
from nodes.samplers.flow_match import FlowMatchTable
from nodes.wan.config import WanConfig
from nodes.wan.dit import WanDiT
from nodes.wan.moe import Wan22Experts
from nodes.wan.node_dit import WanDiTNode

SPEC = "causal_wan22"


def save_diffusers(model: WanDiT, folder: Path) -> Path:
    """A native WanDiT written as diffusers would: config.json + diffusion_pytorch_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.cfg.to_diffusers_config()))
    sd = {k: v.contiguous() for k, v in apply(DIT_NATIVE_TO_DIFFUSERS, model.state_dict()).items()}
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def test_tiny_spec_runs_and_equals_the_rollout():
    """Three engine blocks of the tiny spec = ARRollout over the same two loaded experts, same seed."""
    pipe = engine.load(SPEC)
    pipe.load()
    p = pipe.plan.nodes["sampler"].params
    nfpb, first, blocks = p["frames_per_block"], p["first_block_frames"], p["num_blocks"]
    with pipe.open_session() as s:
        outs = [s.step().outputs for _ in range(blocks)]
        embeds = s.values["text"]["embeds"]
    lat = [o["sampler"]["latent"] for o in outs]
    assert [x.shape[1] for x in lat] == [first] + [nfpb] * (blocks - 1)
    assert all(torch.isfinite(o["decoder"]["pixels"]).all() for o in outs)

    hi, lo, ex = (pipe.nodes[n] for n in ("dit_high", "dit_low", "experts"))
    model = Wan22Experts(hi.handle, lo.handle, ex.p.boundary_ratio * 1000, ex.p.cross_attention)
    sched = ARSchedule.build(FlowMatchTable(p["shift"]), p["steps"], boundary_ratio=p["boundary_ratio"])
    c, h, w = 16, p["latent_height"], p["latent_width"]
    stream = model.open_stream(StreamSpec((c, h, w), nfpb, max_frames=first + (blocks - 1) * nfpb))
    stream.set_conditions(text=embeds)
    g = torch.Generator().manual_seed(int(pipe.plan.spec.inputs["seed"]))
    noise = torch.randn((1, first + (blocks - 1) * nfpb, c, h, w), generator=g)
    ref = ARRollout(stream, sched, nfpb, noise, generator=g, first_block_frames=first).run_all()
    torch.testing.assert_close(torch.cat(lat, dim=1), ref, atol=1e-5, rtol=1e-5)


def _dit_node(name: str, folder: Path, text_len: int) -> WanDiTNode:
    node = WanDiTNode(name, {"checkpoint": str(folder), "text_len": text_len, "dtype": "fp32"}, "cpu")
    node.load()
    return node


def test_golden_experts_through_the_wan_dit_loader():
    """transformer/ and transformer_2/ read by wan.dit (config.json: every size, float32 sinusoid), then the
    golden rollout: final_latents within the case tolerance."""
    cj, inp, rec = inputs_and_record()
    d = case_dir(CASE)
    nodes = {n: _dit_node(n, d / sub, cj["model_kwargs"]["text_len"]) for n, sub in EXPERT_DIRS.items()}
    for n, node in nodes.items():
        want = WanConfig.from_diffusers_config(json.loads((d / EXPERT_DIRS[n] / "config.json").read_text()),
                                               text_len=cj["model_kwargs"]["text_len"])
        assert node.handle.config == want and want.sinusoid_dtype == "float32"
        assert want.num_heads == cj["model_kwargs"]["num_attention_heads"]
    model = Wan22Experts(nodes["high_noise"].handle, nodes["low_noise"].handle, fv(cj)["boundary_ratio"] * 1000)
    stream = open_stream(model, cj, inp["latents"])
    stream.set_conditions(text=inp["prompt_embeds"])
    draws = [rec[f"draw.{k}"] for k in range(sum(1 for n in rec if n.startswith("draw.")))]
    roll = ARRollout(stream, schedule(cj), fv(cj)["num_frames_per_block"], inp["latents"].transpose(1, 2),
                     draws=draws, first_block_frames=cj["block_sizes"][0])
    out = roll.run_all().transpose(1, 2)
    tol = cj["tolerance"]
    torch.testing.assert_close(out, rec["final_latents"], atol=tol["atol"], rtol=tol["rtol"])


def _pipe(tmp_path, high: Path, low: Path, **over):
    cj = json.loads((case_dir(CASE) / "case.json").read_text())
    tl = cj["model_kwargs"]["text_len"]
    sets = [f"nodes.dit_high.params.checkpoint={high}", f"nodes.dit_low.params.checkpoint={low}",
            f"nodes.dit_high.params.text_len={tl}", f"nodes.dit_low.params.text_len={tl}",
            f"nodes.text.params.text_len={tl}", f"nodes.text.params.dim={cj['model_kwargs']['text_dim']}"]
    sets += [f"{k}={v}" for k, v in over.items()]
    return engine.load(SPEC, overrides=sets)


def _golden_copy(tmp_path: Path) -> Path:
    root = tmp_path / "CausalWan2.2"
    for sub in EXPERT_DIRS.values():
        shutil.copytree(case_dir(CASE) / sub, root / sub)
    return root


def test_golden_folders_load_through_the_spec(tmp_path):
    root = _golden_copy(tmp_path)
    pipe = _pipe(tmp_path, root / "transformer", root / "transformer_2")
    pipe.load()
    assert pipe.nodes["dit_high"].handle.config.num_heads == pipe.nodes["dit_low"].handle.config.num_heads


def test_missing_transformer_2_is_refused_before_any_weight(tmp_path):
    root = _golden_copy(tmp_path)
    shutil.move(root / "transformer_2", tmp_path / "kept")
    with pytest.raises(FdError, match="transformer_2.*does not exist"):   # fd validate: a local folder
        _pipe(tmp_path, root / "transformer", root / "transformer_2")
    shutil.move(tmp_path / "kept", root / "transformer_2")
    pipe = _pipe(tmp_path, root / "transformer", root / "transformer_2")
    shutil.rmtree(root / "transformer_2")                   # gone between validation and load
    with pytest.raises(FdError, match="transformer_2"):
        pipe.load()
    assert pipe.nodes["dit_high"].model is None             # the high-noise expert was not read


def test_mismatched_experts_are_refused_before_any_weight(tmp_path):
    root = _golden_copy(tmp_path)
    cfg = json.loads((root / "transformer" / "config.json").read_text())
    other = WanConfig.from_diffusers_config({**cfg, "ffn_dim": cfg["ffn_dim"] + 8}, text_len=16)
    shutil.rmtree(root / "transformer_2")
    save_diffusers(WanDiT(other), root / "transformer_2")
    pipe = _pipe(tmp_path, root / "transformer", root / "transformer_2")
    with pytest.raises(FdError, match="ffn_dim"):
        pipe.load()
    assert pipe.nodes["dit_high"].model is None and pipe.nodes["dit_low"].model is None


@pytest.mark.parametrize("where,value", [("experts", 0.0), ("experts", 1.0), ("experts", 1.5), ("experts", -0.1),
                                         ("sampler", 1.0), ("sampler", 0.0)])
def test_boundary_outside_0_1_is_a_spec_error(where, value):
    with pytest.raises(FdError, match="boundary_ratio") as e:
        engine.load_plan(SPEC, overrides=[f"nodes.{where}.params.boundary_ratio={value}"], check_devices=False)
    assert f"{SPEC}.yaml" in str(e.value) or "command line" in str(e.value)


def test_sampler_and_experts_boundaries_must_agree():
    pipe = engine.load(SPEC, overrides=["nodes.sampler.params.boundary_ratio=0.9"])
    with pytest.raises(FdError, match="boundary_ratio"):
        pipe.load()
    assert pipe.nodes["dit_high"].model is None


def test_viz_names_the_experts_and_their_steps():
    from engine.viz import to_svg
    from engine.viz.model import build
    plan = engine.load_plan(SPEC, check_devices=False)
    g = build(plan)

    def node_facts(plan, name):
        return g.nodes[name].notes
    p = plan.nodes["sampler"].params
    sched = ARSchedule.build(FlowMatchTable(p["shift"]), p["steps"], boundary_ratio=p["boundary_ratio"])
    facts = "\n".join(node_facts(plan, "sampler"))
    for t in sched.rest.t:
        assert f"{t:.1f}" in facts
    assert "first block 1 frame" in facts
    assert any("own KV cache" in f for f in node_facts(plan, "experts"))
    assert "own KV cache" in to_svg(plan, engine="python")


@pytest.mark.parametrize("mode", ["shared_high", "per_expert"])
def test_prompt_switch_refills_the_text_cache_as_the_mode_says(mode):
    pipe = engine.load(SPEC, overrides=[f"nodes.experts.params.cross_attention={mode}", "inputs.num_blocks=2"])
    pipe.load()
    hi, lo = pipe.nodes["dit_high"].require_model(), pipe.nodes["dit_low"].require_model()
    with pipe.open_session() as s:
        s.step()
        s.set_input("prompt", "a blue heron standing in a river")
        s.step()
        embeds = s.values["text"]["embeds"]
        streams = pipe.nodes["sampler"]._graphs.streams
        with torch.no_grad():
            want = {"high": hi.prepare_cross(embeds), "low": lo.prepare_cross(embeds)}
        for s_, own in zip(streams, ("high", "low")):
            src = want["high" if mode == "shared_high" else own]
            for layer in range(hi.cfg.num_layers):
                torch.testing.assert_close(s_.denoiser.cross.k[layer], src.k[layer], atol=0, rtol=0)
                torch.testing.assert_close(s_.denoiser.cross.v[layer], src.v[layer], atol=0, rtol=0)
