"""Attention backends: which one `auto` picks, what validation refuses, and (on a GPU with FlashAttention-4)
that FA4's output and lse equal the float32 formula at the shapes fd runs, partials included."""
import math

import pytest
import torch

from engine import load_plan
from engine.errors import SpecErrors
from engine.runner import read_spec
from nodes.common import attention_table
from nodes.common.attention import _explicit_with_lse, attention, backend_problem, flash4_available
from nodes.common.ring import merge_partials


def test_backend_problem_names_what_is_missing():
    assert backend_problem("math", "cpu") is None
    assert backend_problem("auto", "cpu") is None
    assert "CUDA" in backend_problem("flash4", "cpu")
    assert "unknown" in backend_problem("flash5", "cpu")
    if not flash4_available():
        assert "pip install" in backend_problem("flash4", "cuda")


def test_auto_takes_the_first_installed_backend_of_the_measured_row(monkeypatch):
    monkeypatch.setitem(attention_table.MEASURED, (7, 5), {"ranking": ("flash4", "cudnn", "auto")})
    fast = attention_table.fastest_measured
    assert fast((7, 5), installed=lambda n: True) == "flash4"
    assert fast((7, 5), installed=lambda n: n != "flash4") == "cudnn"
    assert fast((7, 5), installed=lambda n: False) == "auto"
    assert fast((1, 0), installed=lambda n: True) == "auto"        # an unmeasured GPU: torch's own order


def test_every_measured_row_says_where_it_came_from():
    for cap, row in attention_table.MEASURED.items():
        assert row["ranking"][-1] == "auto", cap                    # always a fallback
        assert row["date"] and row["device"] and row["source"], cap


def test_planning_refuses_a_backend_the_device_cannot_run():
    spec = read_spec("tiny_self_forcing", overrides=["nodes.dit.params.attention=flash4"])
    with pytest.raises(SpecErrors) as e:
        load_plan(spec, cuda_devices=0)
    bad = [x for x in e.value.errors if x.code == "unsupported_on_device"]
    assert bad and bad[0].node == "dit" and bad[0].field == "params.attention"
    assert "flash4" in bad[0].message and "CUDA" in bad[0].message
    assert load_plan(read_spec("tiny_self_forcing", overrides=["nodes.dit.params.attention=math"]), cuda_devices=0)


# --------------------------------------------------------------------------- GPU: FlashAttention-4 against the formula
gpu_fa4 = pytest.mark.skipif(not (torch.cuda.is_available() and flash4_available()),
                             reason="needs a CUDA GPU and FlashAttention-4 (the flash-attn-4 wheel)")

# (query tokens, key tokens, heads, head dim): W1 block 5 and steady (4,680-token block against 21 or 24 frames of
# cache), and the 14B shape (40 heads)
SHAPES = [(4680, 28080, 12, 128), (4680, 32760, 12, 128), (4680, 14040, 40, 128)]


def _reference(q, k, v, scale, heads_per_chunk=4):
    outs, lses = [], []
    for h in range(0, q.shape[2], heads_per_chunk):
        sl = slice(h, h + heads_per_chunk)
        o, l = _explicit_with_lse(q[:, :, sl].float(), k[:, :, sl].float(), v[:, :, sl].float(), scale, None)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 2), torch.cat(lses, 2)


@gpu_fa4
@pytest.mark.parametrize("lq,lk,h,d", SHAPES)
def test_flash4_equals_the_formula(lq, lk, h, d):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for n in (lq, lk, lk))
    scale = 1 / math.sqrt(d)
    ref, ref_lse = _reference(q, k, v, scale)
    out = attention(q, k, v, "flash4")
    out2, lse = attention(q, k, v, "flash4", return_lse=True)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel                                  # bf16 output rounding is ~4e-3
    assert torch.equal(out, out2)
    assert lse.shape == ref_lse.shape and (lse - ref_lse).abs().max().item() < 1e-2


@gpu_fa4
def test_ring_merge_of_flash4_partials_equals_one_pass():
    lq, lk, h, d = SHAPES[0]
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for n in (lq, lk, lk))
    cuts = [0, 7000, 19000, lk]                              # uneven shards, as ranks may hold
    parts = [attention(q, k[:, a:b], v[:, a:b], "flash4", return_lse=True) for a, b in zip(cuts, cuts[1:])]
    merged, _ = merge_partials([o.float() for o, _ in parts], [l for _, l in parts])
    ref, _ = _reference(q, k, v, 1 / math.sqrt(d))
    whole = attention(q, k, v, "flash4").float()
    assert ((merged - ref).norm() / ref.norm()).item() < 1e-2
    assert ((merged - whole).norm() / whole.norm()).item() < 1e-2


@gpu_fa4
def test_flash4_is_capturable_in_a_cuda_graph():
    q, k, v = (torch.randn(1, n, 12, 128, device="cuda", dtype=torch.bfloat16) for n in (4680, 9360, 9360))
    expected = attention(q, k, v, "flash4")                  # JIT compile + warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention(q, k, v, "flash4")
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, attention(q, k, v, "flash4"))
    assert not torch.equal(out, expected)


def test_viz_says_which_attention_backend_a_model_node_takes():
    from engine.viz.model import build
    notes = build(load_plan(read_spec("tiny_self_forcing"), cuda_devices=0)).nodes["dit"].notes
    assert "attention: auto → torch SDPA on cpu" in notes
    plan = load_plan(read_spec("tiny_self_forcing", overrides=["nodes.dit.params.attention=math"]), cuda_devices=0)
    assert "attention: math" in build(plan).nodes["dit"].notes


def test_auto_keeps_a_backend_to_the_head_dims_it_was_measured_at(monkeypatch):
    monkeypatch.setitem(attention_table.MEASURED, (7, 5), {"ranking": ("flash4", "cudnn", "auto"),
                                                           "head_dims": {"flash4": (128,)}})
    fast = attention_table.fastest_measured
    assert fast((7, 5), installed=lambda n: True, head_dim=128) == "flash4"
    assert fast((7, 5), installed=lambda n: True, head_dim=64) == "cudnn"
    assert fast((7, 5), installed=lambda n: True) == "flash4"          # no head dim asked: the row's pick
