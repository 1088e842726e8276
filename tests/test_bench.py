"""`fd bench` on the tiny spec on the CPU: the JSON fields BENCHMARKS.md quotes exist and hold what they say."""
from __future__ import annotations

import contextlib
import io
import json
from statistics import median

import pytest

from benchmarks.summarize_fd_bench import parts
from flashdreams_cli.main import main

ARGS = ["bench", "tiny_self_forcing", "inputs.num_blocks=7", "inputs.latent_height=4", "inputs.latent_width=4",
        "--warmup", "1", "--blocks", "6", "--steady-from", "2", "--report-block", "3", "--json"]


@pytest.fixture(scope="module")
def report():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(ARGS) == 0
    return json.loads(out.getvalue())


def test_bench_json_fields(report):
    blocks = report["blocks"]
    assert [b["block"] for b in blocks] == list(range(7)) and [b["warmup"] for b in blocks] == [True] + [False] * 6
    timed = blocks[1:]
    assert report["world_size"] == 1 and report["env"]["device"] == "cpu" and "torch" in report["env"]
    assert report["first_block_s"] == pytest.approx(blocks[0]["wall_ms"] / 1e3)
    assert report["cold_start_s"] == pytest.approx(report["load_s"] + report["first_block_s"])
    assert report["block_ms_median"] == pytest.approx(median(b["wall_ms"] for b in timed))
    assert report["pipeline_ms_median"] == pytest.approx(median(b["pipeline_ms"] for b in timed))
    for b in blocks:   # pipeline = the block-phase nodes (the sinks are left out without --with-sinks)
        assert b["pipeline_ms"] == pytest.approx(b["nodes_ms"]["sampler"] + b["nodes_ms"]["decoder"])
        assert set(b["parts_ms"]) == {"sampler.dit_ms", "sampler.kv_ms"}
        # the DiT's denoising steps and the KV pass are parts of the sampler's time
        assert b["parts_ms"]["sampler.dit_ms"] + b["parts_ms"]["sampler.kv_ms"] <= b["nodes_ms"]["sampler"] * 1.01
    assert report["node_ms_median"]["decoder"] == pytest.approx(median(b["nodes_ms"]["decoder"] for b in timed))
    assert report["parts_ms_median"]["sampler.dit_ms"] == pytest.approx(
        median(b["parts_ms"]["sampler.dit_ms"] for b in timed))
    assert report["report_blocks"]["3"] == blocks[3]
    assert report["graphs"]["sampler"].startswith("eager") and report["peak_mem_gib"] is None
    assert report["attention"] == {"dit": "auto"}                       # the DiT's backend, named
    total, absolute = report["final_latent_checksum"]["sampler.latent"]
    assert absolute >= abs(total) > 0


def test_bench_steady_is_a_median_with_its_count(report):
    st = report["steady"]
    rows = [b for b in report["blocks"] if not b["warmup"] and b["block"] >= 2]
    assert (st["from_block"], st["blocks"], st["block_indices"]) == (2, 5, [2, 3, 4, 5, 6])
    assert st["pipeline_ms_median"] == pytest.approx(median(b["pipeline_ms"] for b in rows))
    assert st["parts_ms_median"]["sampler.kv_ms"] == pytest.approx(median(b["parts_ms"]["sampler.kv_ms"] for b in rows))
    # what benchmarks/summarize_fd_bench.py reads from a block row (DiT, KV, decode, total)
    assert parts(rows[0]) == (rows[0]["parts_ms"]["sampler.dit_ms"], rows[0]["parts_ms"]["sampler.kv_ms"],
                              rows[0]["nodes_ms"]["decoder"], rows[0]["pipeline_ms"])


def test_bench_warns_when_steady_has_fewer_than_5_blocks(capsys):
    assert main(ARGS[:5] + ["inputs.num_blocks=3", "--warmup", "1", "--blocks", "2", "--steady-from", "1",
                            "--json"]) == 0
    err = capsys.readouterr().err
    assert "only 2 timed blocks from block 1 on; a steady figure needs 5" in err
