"""Node-level parity: every golden rollout variant through the ``ar.sampler`` node, spec -> plan -> session.

The rollout tests drive ``ARRollout`` and the DiT directly; this runs the same goldens through what a
user runs: a spec whose ``wan.dit`` loads the case's weights and whose ``ar.sampler`` params all come
from the case (shift, step lists, frames per block, window, sink, context noise, warp, latent size,
block count). The prompt embeddings and the I2V image latent come in from the case's inputs through a
test node. The goldens' noise and re-noise draws were not drawn from a seed the node could use, so the
node's ``torch.randn`` calls are replayed from the record, in the order the node documents: all
blocks' noise first with a global cache, each block's noise before its draws with a window. The
block latents the session emits must match the recorded final latents.
"""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

import engine
from engine import Node, Param, Port, Registry
from engine.types import LATENT, TEXT_EMBEDDING
from goldens import case_json, case_value, tensors, variant_params

CASES = ("causal_selfforcing", "causal_forcing_framewise", "causal_forcing_i2v")


class GoldenInputs(Node):
    type_name = "test.golden_inputs"
    outputs = (Port("embeds", TEXT_EMBEDDING, "the case's prompt_embeds"),
               Port("image", LATENT, "the case's initial_latent (zeros when it has none)"))
    params = (Param("path", str, "", "the case's inputs, as a plain safetensors file"),)
    phase = "session"

    def run(self, inputs, state, step):
        from safetensors.torch import load_file
        t = load_file(self.p.path)
        return {"embeds": t["prompt_embeds"], "image": t.get("initial_latent", torch.zeros(1))}


class ReplayedRandn:
    """Stands in for ``torch`` in nodes.ar: ``randn`` hands out the recorded noise (5-D requests, a
    block or all blocks at once) and re-noise draws (4-D requests, [B*f, C, H, W]) in call order."""

    def __init__(self, noise: torch.Tensor, draws: list[torch.Tensor]):
        self.noise, self.draws = noise, draws
        self.frame = self.draw = 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn(self, *size, generator=None, device=None, dtype=None):
        size = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        if len(size) == 5:
            out = self.noise[:, self.frame:self.frame + size[1]]
            self.frame += size[1]
        else:
            assert self.draw < len(self.draws), "more re-noise draws than recorded"
            out = self.draws[self.draw]
            self.draw += 1
        assert tuple(out.shape) == size, (size, out.shape)
        return out.clone()


def golden_spec(cj: dict, v: dict, inputs_path, weights_path, out_path, noise: torch.Tensor, image: bool) -> str:
    nfpb = case_value(cj, v, "num_frame_per_block")
    local = case_value(cj, v, "local_attn_size", -1)
    kw = cj["model_kwargs"]
    sampler = dict(
        steps=case_value(cj, v, "denoising_step_list"),
        first_chunk_steps=case_value(cj, v, "denoising_step_list_first_chunk"),
        warp=case_value(cj, v, "warp_denoising_step", True),
        shift=float(case_value(cj, v, "timestep_shift")),
        frames_per_block=nfpb, latent_channels=noise.shape[2], latent_height=noise.shape[3],
        latent_width=noise.shape[4], num_blocks=noise.shape[1] // nfpb,
        sink_frames=case_value(cj, v, "sink_size", 0), window_frames=None if local == -1 else local,
        context_noise=float(case_value(cj, v, "context_noise", 0)), batch=noise.shape[0])
    wiring = {"model": "dit.model", "text": "golden.embeds"}
    if image:
        wiring["image_latent"] = "golden.image"
    spec = {
        "name": "golden_node_parity", "inputs": {"prompt": "unused"},
        "nodes": {
            "golden": {"type": "test.golden_inputs", "params": {"path": str(inputs_path)}, "device": "cpu"},
            "dit": {"type": "wan.dit", "device": "cpu",
                    "params": {"checkpoint": str(weights_path), "num_heads": kw["num_heads"],
                               "text_len": kw["text_len"], "dtype": "fp32", "compile": "off"}},
            "sampler": {"type": "ar.sampler", "in": wiring, "params": sampler, "device": "cpu"},
        },
        "sinks": {"latents": {"type": "sink.safetensors", "in": {"tensor": "sampler.latent"},
                              "params": {"path": str(out_path)}}},
    }
    return yaml.safe_dump(spec, sort_keys=False)


@pytest.mark.parametrize("case,vname", variant_params(CASES))
def test_golden_rollout_through_the_ar_sampler_node(case, vname, tmp_path, monkeypatch):
    cj = case_json(case)
    v = cj["variants"][vname]
    inputs, record = tensors(case, cj["files"]["inputs"]), tensors(case, v["record_file"])
    save_file({k: t.contiguous() for k, t in inputs.items()}, str(tmp_path / "inputs.safetensors"))
    save_file(tensors(case, cj["weights"]["file"]), str(tmp_path / "dit.safetensors"))
    noise, image = inputs["noise"], "initial_latent" in inputs
    spec = tmp_path / "spec.yaml"
    spec.write_text(golden_spec(cj, v, tmp_path / "inputs.safetensors", tmp_path / "dit.safetensors",
                                tmp_path / "out.safetensors", noise, image))
    reg = Registry.default()
    reg.add(GoldenInputs)
    rng = ReplayedRandn(noise, [record[f"draw.{k}"] for k in range(v["num_draws"])])
    monkeypatch.setattr("nodes.ar.node.torch", rng)
    monkeypatch.setattr("nodes.ar.rollout.torch", rng)
    pipe = engine.load(spec, registry=reg)
    blocks = pipe.plan.nodes["sampler"].params["num_blocks"]
    with pipe.load().open_session() as s:
        got = torch.cat([s.step().outputs["sampler"]["latent"] for _ in range(blocks)], 1)
    assert (rng.frame, rng.draw) == (noise.shape[1], v["num_draws"])
    tol = v["tolerance"]["final_latents"]
    torch.testing.assert_close(got, record["final_latents"], atol=tol["atol"], rtol=tol["rtol"])
