"""`fd viz` end to end: the files it writes carry the plan's facts, a legend and (after --run) timings."""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

import engine
from engine import viz
from engine.viz.model import build
from flashdreams_cli.main import main


def test_python_svg_of_a_branched_spec_draws_inputs_ports_legend_and_kv_cache(tmp_path):
    out = tmp_path / "p.svg"
    assert main(["viz", "wan21_i2v_14b", "-o", str(out), "--layout", "python"]) == 0
    text = out.read_text()
    root = ET.fromstring(text)
    ids = {g.get("data-node") for g in root.iter("{http://www.w3.org/2000/svg}g") if g.get("data-node")}
    assert ids == {"inputs.prompt", "inputs.negative_prompt", "inputs.seed", "text", "image", "clip", "condition",
                   "dit", "sampler", "decoder", "video"}
    assert "legend" in text and "runs once per session" in text and "offload" in text
    assert ">negative_embeds<" in text and ">text_embedding<" in text      # port names and wire types
    sf = viz.to_svg(engine.load_plan("self_forcing", check_devices=False), engine="python")
    assert re.search(r"KV cache: sink 0 · window 21 frames", sf) and "GiB" in sf


def test_kv_cache_bytes_follow_the_cache_formula():
    plan = engine.load_plan("self_forcing", ["nodes.sampler.params.window_frames=9",
                                             "nodes.sampler.params.sink_frames=3"], check_devices=False)
    kv = build(plan).nodes["sampler"].kv
    cfg = plan.nodes["dit"].build().size_config()
    p = plan.nodes["sampler"].build().p
    tokens = (p.latent_height // cfg.patch_size[1]) * (p.latent_width // cfg.patch_size[2])
    assert kv["sink_frames"] == 3 and kv["window_frames"] == 9 and kv["dtype"] == "float32"
    assert kv["bytes"] == 2 * cfg.num_layers * 9 * tokens * cfg.num_heads * cfg.head_dim * 4
    from nodes.common.kv_cache import SelfKVCache   # the cache the sampler really allocates, on no memory
    real = SelfKVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim, tokens, sink_frames=3, window_frames=9,
                       device="meta")
    assert kv["bytes"] == sum(t.numel() * t.element_size() for t in (real.k, real.v))


def test_context_parallel_and_capture_frames_are_drawn():
    plan = engine.load_plan("self_forcing", ["nodes.dit.parallel.context=2"], check_devices=False, world_size=2)
    g = build(plan)
    assert g.groups() == {"context parallel: ring × 2": ["dit"]}
    for n in ("sampler", "decoder"):          # as the planner decides on CUDA; this machine has none
        g.nodes[n].captured = True
    assert g.groups()["CUDA graph segment 1"] == ["sampler", "decoder"]
    svg = viz.svg.render(g)
    assert svg.count('class="frame"') >= 2 and "context parallel: ring × 2" in svg and "CUDA graph segment 1" in svg
    assert "frame: CUDA graph segment" in svg and "frame: context parallel" in svg          # legend rows


def test_html_is_one_offline_file_with_node_details(tmp_path):
    out = tmp_path / "p.html"
    assert main(["viz", "wan21_i2v_14b", "-o", str(out)]) == 0
    text = out.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)          # nothing fetched
    data = json.loads(re.search(r"<script type='application/json' id='fd-data'>(.*?)</script>", text, re.S).group(1))
    assert data["nodes"]["sampler"]["params"]["num_steps"] == 40
    assert re.search(r"wan21_i2v_14b\.yaml:\d+$", data["nodes"]["sampler"]["where"])
    assert data["nodes"]["clip"]["doc"]
    assert "g.ELK" in text and len(data["elk"]["children"]) == len(data["nodes"])      # elkjs shipped inline
    assert {e["type"] for e in data["edges"]} >= {"text_embedding", "causal_denoiser"}


@pytest.mark.skipif(not viz.dot_available(), reason="Graphviz `dot` is not installed")
def test_dot_svg_and_png(tmp_path):
    assert main(["viz", "wan21_i2v_14b", "-o", str(tmp_path / "p.svg")]) == 0
    assert "negative_embeds" in (tmp_path / "p.svg").read_text()
    assert main(["viz", "wan21_i2v_14b", "-o", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_colours_nodes_by_measured_ms_and_shows_p50_p99(tmp_path):
    out = tmp_path / "p.svg"
    assert main(["viz", "preview_cpu", "--run", "3", "-o", str(out), "--layout", "python",
                 f"sinks.video.params.path={tmp_path / 'v.mp4'}"]) == 0
    text = out.read_text()
    assert len(re.findall(r"p50 [\d.]+ ms · p99 [\d.]+ ms/block \(n=3\)", text)) >= 3
    assert "fill: measured p50 ms" in text


def test_terminal_tree_fits_100_columns(capsys):
    assert main(["viz", "wan21_i2v_14b"]) == 0
    out = capsys.readouterr().out
    assert "graph inputs" in out and "every block" in out and "inputs.seed" in out
    assert max(len(line) for line in out.splitlines()) <= 100


def test_without_graphviz_svg_falls_back_to_python_and_png_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(viz._dot, "available", lambda: False)
    plan = engine.load_plan("preview_cpu", check_devices=False)
    assert 'class="legend"' in viz.to_svg(plan)                       # our renderer, not Graphviz's
    assert main(["viz", "preview_cpu", "-o", str(tmp_path / "p.png")]) == 2
    assert not (tmp_path / "p.png").exists()
