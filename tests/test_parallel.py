"""Context-parallel attention is exact against one device (CPU, gloo, 2-4 local ranks)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

import parallel_workers as pw
from engine.parallel import SINGLE, ParallelGroup, check_context_size, make_context_groups, spawn_ranks
from nodes.common.attention import attention
from nodes.common.ring import merge_partials, merge_two, ring_attention, ring_attention_gather
from nodes.common.ulysses import ulysses_attention

TOL = dict(rtol=1e-5, atol=1e-5)
ROOT = Path(__file__).resolve().parents[1]


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- single process: the merge identity -------------------------------------------------------

def test_lse_merge_of_shards_equals_full_attention():
    B, Lq, Lk, H, D = 2, 5, 23, 3, 8
    q, k, v = rand(B, Lq, H, D, seed=0), rand(B, Lk, H, D, seed=1), rand(B, Lk, H, D, seed=2)
    full = attention(q, k, v)
    cuts = [0, 7, 7, 16, 23]                                    # second shard is empty
    parts = [attention(q, k[:, a:b], v[:, a:b], return_lse=True) for a, b in zip(cuts, cuts[1:])]
    assert torch.isneginf(parts[1][1]).all() and (parts[1][0] == 0).all()
    out, lse = merge_partials([o for o, _ in parts], [l for _, l in parts])
    assert_close(out, full, **TOL)
    scores = torch.einsum("bqhd,bkhd->bqhk", q, k) / math.sqrt(D)
    assert_close(lse, torch.logsumexp(scores, -1), **TOL)
    acc_o, acc_l = parts[0]                                     # the ring's running merge agrees
    for o, l in parts[1:]:
        acc_o, acc_l = merge_two(acc_o, acc_l, o, l)
    assert_close(acc_o, full, **TOL)
    assert_close(acc_l, lse, **TOL)


def test_explicit_partial_matches_fused_and_masks_rows_to_nothing():
    B, Lq, Lk, H, D = 1, 4, 9, 2, 8
    q, k, v = rand(B, Lq, H, D, seed=3), rand(B, Lk, H, D, seed=4), rand(B, Lk, H, D, seed=5)
    fused = attention(q, k, v, return_lse=True)
    explicit = attention(q, k, v, return_lse=True, mask=torch.ones(Lq, Lk, dtype=torch.bool))
    assert_close(explicit[0], fused[0], **TOL)
    assert_close(explicit[1], fused[1], **TOL)
    mask = torch.ones(Lq, Lk, dtype=torch.bool)
    mask[1] = False                                             # query row 1 sees nothing here
    o, l = attention(q, k, v, return_lse=True, mask=mask)
    assert torch.isneginf(l[:, 1]).all() and (o[:, 1] == 0).all()
    # Merged with a partial that does see keys, the empty row takes that partial's answer, no NaN.
    o2, l2 = attention(q, k[:, :3], v[:, :3], return_lse=True)
    out, _ = merge_partials([o, o2], [l, l2])
    assert not out.isnan().any()
    assert_close(out[:, 1], o2[:, 1], **TOL)
    # Every partial empty: zero output, -inf lse, still no NaN.
    empty = attention(q, k[:, :0], v[:, :0], return_lse=True)
    out, lse = merge_partials([empty[0], empty[0]], [empty[1], empty[1]])
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_size_one_group_is_plain_attention_without_distributed():
    q, k, v = rand(1, 6, 2, 8, seed=6), rand(1, 10, 2, 8, seed=7), rand(1, 10, 2, 8, seed=8)
    assert not dist.is_initialized()
    full = attention(q, k, v)
    groups = make_context_groups(1, {"dit": 1}, {"dit": "ulysses"})
    assert groups["dit"] == ParallelGroup(strategy="ulysses") and not groups["dit"].active
    for g in (SINGLE, groups["dit"]):
        assert torch.equal(ring_attention_gather(q, k, v, g), full)
        assert torch.equal(ring_attention(q, k, v, g), full)
        assert torch.equal(ulysses_attention(q, k, v, g), full)


def test_check_context_size_and_group_validation():
    assert check_context_size(1, 1) is None
    assert check_context_size(2, 4) is None and check_context_size(4, 4) is None
    assert "divide" in check_context_size(3, 4)
    assert "divide" in check_context_size(8, 4)
    assert ">= 1" in check_context_size(0, 4)
    assert ">= 1" in check_context_size(-2, 4)
    assert "integer" in check_context_size(2.0, 4)
    assert "integer" in check_context_size(True, 1)
    with pytest.raises(ValueError, match="node 'dit'.*divide"):
        make_context_groups(4, {"dit": 3})
    with pytest.raises(ValueError, match="strategy"):
        make_context_groups(1, {"dit": 1}, {"dit": "tree"})
    with pytest.raises(RuntimeError, match="init_distributed"):
        make_context_groups(2, {"dit": 2})


# --- several ranks ---------------------------------------------------------------------------

def _cache_case(frames, q_frames, tokens_per_frame, heads, head_dim, seed):
    """A KV cache of ``frames`` frames; the query block is the last ``q_frames`` frames' tokens."""
    k = rand(1, frames * tokens_per_frame, heads, head_dim, seed=seed)
    v = rand(1, frames * tokens_per_frame, heads, head_dim, seed=seed + 1)
    q = rand(1, q_frames * tokens_per_frame, heads, head_dim, seed=seed + 2)
    return dict(q=q, k=k, v=v, frames=frames, tokens_per_frame=tokens_per_frame)


@pytest.mark.parametrize("nproc", [2, 3])
def test_context_parallel_attention_matches_one_device(nproc):
    heads, head_dim, tpf = 2 * nproc, 8, 6
    cases = {
        "cache": {
            "uneven": _cache_case(2 * nproc + 1, 3, tpf, heads, head_dim, seed=10),   # frames don't split evenly
            "empty_rank": _cache_case(nproc - 1, 1, tpf, heads, head_dim, seed=20),  # the last rank holds nothing
        },
        "seq": {n: rand(2, nproc * 7, heads, head_dim, seed=30 + i) for i, n in enumerate("qkv")},
    }
    results = spawn_ranks(pw.attention_cases, nproc, args=(cases,), timeout_s=60)
    seq = cases["seq"]
    full = attention(seq["q"], seq["k"], seq["v"])
    shard = full.shape[1] // nproc
    for rank, out in enumerate(results):
        assert out["group"] == (rank, nproc, tuple(range(nproc)), "ulysses", 1, False)
        for name, c in cases["cache"].items():                                     # (b) replicated q
            assert_close(out[f"cache.{name}"], attention(c["q"], c["k"], c["v"]), **TOL)
        mine = full[:, rank * shard:(rank + 1) * shard]
        assert_close(out["ring"], mine, **TOL)                                     # (c) true ring
        assert_close(out["ulysses"], mine, **TOL)                                  # (d) Ulysses
        assert "not divisible" in out["ulysses_bad_heads"]


def test_context_groups_partition_the_world():
    qs = [rand(1, 4, 2, 8, seed=40), rand(1, 4, 2, 8, seed=41)]
    k, v = rand(1, 12, 2, 8, seed=42), rand(1, 12, 2, 8, seed=43)
    results = spawn_ranks(pw.subgroup_cases, 4, args=(qs, k, v), timeout_s=60)
    for rank, out in enumerate(results):
        pair = rank // 2
        assert out["pair"] == pair and out["ranks"] == (2 * pair, 2 * pair + 1) and out["all_size"] == 4
        assert_close(out["out"], attention(qs[pair], k, v), **TOL)


# --- failures end every rank, with a message -------------------------------------------------

SCRIPT = """
import json, os, sys
from engine.parallel.launch import LaunchError, main_or_exit, spawn_ranks
import parallel_workers as pw
if __name__ == "__main__":
    root = sys.argv[1]
    for name, timeout_s in (("die_on_rank1", 30), ("hang_on_rank1", 3)):
        os.makedirs(os.path.join(root, name))
        try:
            spawn_ranks(getattr(pw, name), 2, args=(os.path.join(root, name),), timeout_s=timeout_s, pg_timeout_s=60)
            print(json.dumps({name: "no error"}))
        except LaunchError as e:
            print(json.dumps({name: str(e)}))
    os.makedirs(os.path.join(root, "raise_on_rank1"))
    main_or_exit(pw.raise_on_rank1, 2, args=(os.path.join(root, "raise_on_rank1"),), timeout_s=30, pg_timeout_s=60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_failing_rank_ends_all_ranks_with_a_message(tmp_path):
    """A rank that raises, one that dies hard, and one that hangs: each launch ends every rank and says why.
    Run in a subprocess with its own timeout, so a regression fails this test instead of hanging pytest."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=50)
    assert time.monotonic() - t0 < 40
    report = {k: v for line in proc.stdout.splitlines() for k, v in json.loads(line).items()}
    assert "rank 1 of 2 died without a Python exception (exit code 7)" in report["die_on_rank1"], report
    assert "timed out after 3s" in report["hang_on_rank1"] and "still running: [0, 1]" in report["hang_on_rank1"]
    assert proc.returncode == 1, proc.stderr                     # main_or_exit: message, exit 1
    assert "error: rank 1 of 2 raised" in proc.stderr and "RuntimeError: boom from rank 1" in proc.stderr, proc.stderr
    pids = [int(p.read_text()) for p in tmp_path.glob("*/rank*.pid")]
    assert len(pids) == 6
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)
