"""The model seam: any causal model streams through ar.sampler by the causal-model contract.

The toy world model of examples/custom_node is not Wan: its own network, its own cache (a ring
of frame summaries). Its rollout through ``ar.sampler`` is checked against an independent
reference written here from the definitions: the warped FlowMatch timesteps in closed form,
the x0 / re-noise updates, the seeded draw order, and a toy network that recomputes its
memory from the committed frames on every call instead of caching.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import engine
from engine import Node, Port, Registry, SpecErrors, Step
from engine.types import DENOISER

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_node"
sys.path.insert(0, str(EXAMPLE))
from fd_example_nodes.toy_causal import ToyCausal, ToyCausalNode, ToyConfig, ToyNet  # noqa: E402

from nodes.ar.node import ARSamplerNode  # noqa: E402
from nodes.common.causal import CausalModel, StreamSpec, TimestepExperts  # noqa: E402

SPEC = EXAMPLE / "specs" / "toy_world.yaml"


def registry(*extra) -> Registry:
    reg = Registry.default()
    for t in (ToyCausalNode,) + extra:
        if t.type_name not in reg:
            reg.add(t)
    return reg


def warped(step: int, shift: float) -> tuple[float, float]:
    """(timestep, sigma) of a step of the shifted 1000-entry FlowMatch table, in closed form."""
    s = step / 1000.0
    sigma = shift * s / (1 + (shift - 1) * s)
    return 1000.0 * sigma, sigma


class Reference:
    """The toy network without a cache: memory = summaries of the committed frames in the window
    plus this call's frames, recomputed from scratch on every call."""

    def __init__(self, net: ToyNet, text: torch.Tensor, window: int):
        self.net, self.text, self.window = net, text, window
        self.committed: dict[int, torch.Tensor] = {}

    def __call__(self, x, t, frame_start, action=None, commit=False):
        tt = torch.full((x.shape[0], 1), t)
        h = self.net.hidden(x, tt, self.text, action)
        now = h.mean(2)
        end = frame_start + x.shape[1]
        past = [self.committed[f] for f in range(max(0, end - self.window), frame_start)]
        memory = torch.cat([torch.stack(past, 1), now], 1) if past else now
        if commit:
            for i in range(x.shape[1]):
                self.committed[frame_start + i] = now[:, i]
        return self.net.predict(h, memory).reshape(x.shape)


def reference_rollout(net, text, *, steps, shift, nfpb, blocks, shape, window, seed, actions=None):
    g = torch.Generator().manual_seed(seed)
    ref, out = Reference(net, text, window), []
    for b in range(blocks):
        x = torch.randn((shape[0], nfpb) + shape[1:], generator=g)
        act = None if actions is None else actions[b]
        for i, step in enumerate(steps):
            t, sigma = warped(step, shift)
            x0 = (x.double() - sigma * ref(x, t, b * nfpb, act).double()).float()
            if i + 1 < len(steps):
                draw = torch.randn((shape[0] * nfpb,) + shape[1:], generator=g).reshape(x0.shape)
                s_next = warped(steps[i + 1], shift)[1]
                x = (1 - s_next) * x0 + s_next * draw
        ref(x0, 0.0, b * nfpb, act, commit=True)
        out.append(x0)
    return torch.cat(out, 1)


def test_toy_model_streams_through_ar_sampler_like_the_reference(tmp_path):
    pipe = engine.load(SPEC, overrides=[f"sinks.latents.params.path={tmp_path / 'l.safetensors'}"],
                       registry=registry())
    with pipe.load().open_session() as s:
        got = torch.cat([s.step().outputs["sampler"]["latent"] for _ in range(4)], 1)
        text = s.values["text"]["embeds"]
    p = pipe.plan.nodes["sampler"].params
    want = reference_rollout(pipe.nodes["world"].model.net, text, steps=p["steps"], shift=p["shift"],
                             nfpb=p["frames_per_block"], blocks=4, shape=(1, 4, 3, 5), window=p["window_frames"],
                             seed=0)
    assert got.shape == (1, 8, 4, 3, 5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "l.safetensors").exists()
    # the shift param is honoured: another shift gives other frames
    other = reference_rollout(pipe.nodes["world"].model.net, text, steps=p["steps"], shift=5.0, nfpb=2, blocks=4,
                              shape=(1, 4, 3, 5), window=4, seed=0)
    assert not torch.allclose(other, got, atol=1e-3)


def test_block_conditions_reach_the_model_by_name():
    torch.manual_seed(0)
    net = ToyNet(ToyConfig(channels=3, text_dim=6)).eval().requires_grad_(False)
    model, text = ToyCausal(net), torch.randn(1, 5, 6)
    node = ARSamplerNode("sampler", {"steps": [1000, 500], "shift": 2.0, "frames_per_block": 1, "latent_channels": 3,
                                     "latent_height": 2, "latent_width": 2, "window_frames": 2, "seed": 7})
    actions = [torch.randn(1, 1, 2) for _ in range(3)]
    state = node.new_state()
    got = torch.cat([node.run({"model": model, "text": text, "action": a}, state, Step(b, {}))["latent"]
                     for b, a in enumerate(actions)], 1)
    want = reference_rollout(net, text, steps=[1000, 500], shift=2.0, nfpb=1, blocks=3, shape=(1, 3, 2, 2),
                             window=2, seed=7, actions=actions)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(engine.FdError, match="takes no 'camera'"):
        node.run({"model": model, "text": text, "camera": torch.zeros(1)}, node.new_state(), Step(0, {}))


def test_expert_by_timestep_and_a_context_pass_at_a_chosen_noise_level():
    """TimestepExperts sends each denoising call to the expert owning t (t >= bound -> high) and
    commits every block into every expert's own cache; context_noise re-noises the clean block
    to that level before the context pass (OmniDreams re-encodes at t=128)."""
    torch.manual_seed(1)
    nets = [ToyNet(ToyConfig(channels=2, text_dim=4)).eval().requires_grad_(False) for _ in range(2)]
    calls = []

    class Spy(ToyCausal):
        def open_stream(self, spec):
            stream, tag = super().open_stream(spec), self.tag

            class S(type(stream)):
                committing = False

                def denoise(s, x, t, f, **kw):
                    if not s.committing:
                        calls.append((tag, "denoise", t))
                    return super().denoise(x, t, f, **kw)

                def commit(s, x, t, f, **kw):
                    calls.append((tag, "commit", t))
                    s.committing = True
                    try:
                        return super().commit(x, t, f, **kw)
                    finally:
                        s.committing = False
            stream.__class__ = S
            return stream

    high, low = Spy(nets[0]), Spy(nets[1])
    high.tag, low.tag = "high", "low"
    bound = warped(700, 3.0)[0] - 0.01  # the float32 table's value of step 700 goes high
    experts = TimestepExperts([(bound, high), (0.0, low)])
    node = ARSamplerNode("s", {"steps": [1000, 700, 400], "shift": 3.0, "frames_per_block": 1, "latent_channels": 2,
                               "latent_height": 1, "latent_width": 2, "window_frames": 3, "context_noise": 128.0})
    state = node.new_state()
    node.run({"model": experts, "text": torch.randn(1, 3, 4)}, state, Step(0, {}))
    ts = [round(c[2], 3) for c in calls]
    assert [c[:2] for c in calls] == [("high", "denoise"), ("high", "denoise"), ("low", "denoise"),
                                      ("low", "commit"), ("high", "commit")]
    assert ts[:3] == [round(warped(s, 3.0)[0], 3) for s in (1000, 700, 400)] and ts[3:] == [128.0, 128.0]
    assert state.stream.streams[0].memory.abs().sum() > 0 and state.stream.streams[1].memory.abs().sum() > 0


class PlainDenoiser(Node):
    type_name = "test.plain_denoiser"
    outputs = (Port("model", DENOISER, "a bidirectional-only denoiser"),)
    phase = "session"


def test_a_denoiser_without_the_contract_is_refused_at_validation(tmp_path, monkeypatch, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text(SPEC.read_text().replace("type: example.toy_causal", "type: test.plain_denoiser")
                    .replace("params: {channels: 4, dim: 16, text_dim: 32}", "params: {}"))
    with pytest.raises(SpecErrors) as e:
        engine.load_plan(spec, registry=registry(PlainDenoiser))
    err = next(x for x in e.value.errors if x.node == "sampler")
    assert err.location.line == spec.read_text().splitlines().index("  sampler:") + 3 or err.location.line > 0
    assert "causal_denoiser" in str(err)
    from flashdreams_cli.main import main
    reg = registry(PlainDenoiser)
    monkeypatch.setattr(Registry, "default", classmethod(lambda cls: reg))
    assert main(["validate", str(spec)]) == 2
    out = capsys.readouterr().err
    assert f"{spec}:" in out and "causal_denoiser" in out and "Traceback" not in out
    # and at run time, a value that is not a CausalModel gets a clear message, not an AttributeError
    node = ARSamplerNode("s", {})
    with pytest.raises(engine.FdError, match="not a causal model"):
        node.run({"model": object(), "text": torch.zeros(1, 1, 1)}, node.new_state(), Step(0, {}))


def test_contract_is_abstract():
    with pytest.raises(TypeError):
        CausalModel()
    spec = StreamSpec(frame_shape=(4, 3, 5), frames_per_block=2, window_frames=4)
    assert ToyCausal(ToyNet(ToyConfig())).open_stream(spec).window == 4
    assert math.isfinite(warped(500, 5.0)[0])
