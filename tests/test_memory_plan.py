"""The memory plan (engine/memory.py) against real tensors: weights of every packaged spec's model nodes,
the KV cache / cross K/V / noise a tiny rollout really allocates, and the fit check with its suggestions."""
import json

import pytest
import torch

import engine
from engine.memory import GiB, fit_warnings, memory_plan, parse_bytes
from engine.spec import packaged_spec_names
from nodes.common.model_node import ModelNode
from nodes.common.params import resolve_dtype


def _module_bytes(module, dtype) -> int:
    return sum(p.numel() * torch.empty((), dtype=dtype).element_size() for p in module.parameters())


@pytest.mark.parametrize("spec", packaged_spec_names())
def test_weight_bytes_equal_tensors_built_from_the_config(spec):
    """Full-size specs: the module of the same config built on the meta device (shapes and dtype are real,
    storage is not); this also checks the text encoder's closed-form count against the real UMT5 class."""
    plan = engine.load_plan(spec, check_devices=False)
    mp = {n.node: n for n in memory_plan(plan).nodes}
    checked = 0
    for name in plan.order:
        np_ = plan.nodes[name]
        if not issubclass(np_.node_type, ModelNode):
            continue
        node = np_.build()
        with torch.device("meta"):
            modules = [node.build_random(), *node.companions_random()]
        want = sum(_module_bytes(m, resolve_dtype(node.p.dtype, node.device)) for m in modules)
        assert mp[name].weights == want, (spec, name, mp[name].weights_source)
        checked += 1
    if not checked:   # a spec without model nodes (preview_cpu) holds no weights
        assert all(n.weights == 0 for n in mp.values())


def test_weight_bytes_equal_loaded_tensors_tiny(tmp_path):
    pipe = engine.load("tiny_self_forcing", overrides=[f"sinks.video.params.path={tmp_path / 'v.mp4'}"]).load()
    mp = {n.node: n for n in memory_plan(pipe.plan).nodes}
    for name in ("text", "dit", "decoder"):
        real = sum(p.numel() * p.element_size() for p in pipe.nodes[name].model.parameters())
        assert mp[name].weights == real, name


@pytest.mark.parametrize("extra", [(), ("nodes.sampler.params.window_frames=6", "nodes.sampler.params.sink_frames=3",
                                        "nodes.sampler.params.rope_mode=relative", "nodes.sampler.params.batch=2")],
                         ids=["global", "window-sink-relative-batch2"])
def test_sampler_state_equals_the_allocated_cache(tmp_path, extra):
    pipe = engine.load("tiny_self_forcing", overrides=[f"sinks.video.params.path={tmp_path / 'v.mp4'}",
                                                       *extra]).load()
    est = {n.node: n for n in memory_plan(pipe.plan).nodes}["sampler"]
    with pipe.open_session() as s:
        s.step()
        st = s.states["sampler"]
        cache, static = st.stream.cache, st.stream.denoiser.static.buffers
        real = sum(t.nbytes for t in (cache.k, cache.v, cache.sink_k, st.noise) if t is not None)
        real += sum(t.nbytes for t in static.values())
    assert est.state == real, est.state_what


def test_fit_check_and_suggestions():
    plan = engine.load_plan("self_forcing", check_devices=False)
    assert memory_plan(plan, device="h100").fits is True
    small = memory_plan(plan, device="t4", memory="8GiB")
    assert small.fits is False and small.budget == 8 * GiB
    text = "\n".join(small.suggestions)
    assert "window_frames" in text and "parallel: {context: N}" in text and "a card with more memory" in text
    assert parse_bytes("24GiB") == 24 * GiB and parse_bytes("512 MiB") == 512 * 2 ** 20 and parse_bytes("80GB") == 80e9


def test_fd_plan_cli(capsys):
    from flashdreams_cli.main import main
    assert main(["plan", "self_forcing", "--device", "h100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and {n["node"] for n in out["nodes"]} >= {"text", "dit", "sampler"}
    assert main(["plan", "self_forcing", "--memory", "4GiB"]) == 3
    assert main(["plan", "self_forcing", "--device", "h1OO"]) == 2
    assert "unknown device" in capsys.readouterr().err


def test_exec_warns_when_the_host_lacks_memory(monkeypatch):
    import engine.memory as m
    plan = engine.load_plan("tiny_self_forcing")
    assert fit_warnings(plan) == []
    monkeypatch.setattr(m, "host_available_bytes", lambda: 1024)
    (w,) = fit_warnings(plan)
    assert "on cpu" in w and "fd plan tiny_self_forcing" in w
