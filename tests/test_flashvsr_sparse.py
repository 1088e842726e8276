"""FlashVSR block-sparse attention (golden ``flashvsr_sparse_attn``): the draft mask exactly, the masked output,
and the pieces against independent re-derivations (brute-force loops)."""
import math

import pytest
import torch
from goldens import case_json, has_case, tensors

from nodes.flashvsr.sparse_attention import (BLOCK, draft_block_mask, from_windows, local_window_mask,
                                             masked_attention, to_windows, topk_blocks)

CASE = "flashvsr_sparse_attn"


def variants():
    if not has_case(CASE):
        return [pytest.param(None, id="absent")]
    return [pytest.param(v, id=v) for v in sorted(case_json(CASE)["config"]["variants"])]


def load(variant):
    cj = case_json(CASE)
    c, v = cj["config"], cj["config"]["variants"][variant]
    inp, out = tensors(CASE, cj["files"]["inputs"]), tensors(CASE, cj["files"]["outputs"])
    heads, (f, h, w) = c["num_heads"], (v["f"], c["h"], c["w"])
    q, k, val = (to_windows(inp[f"{variant}.{n}"].unflatten(-1, (heads, -1)), f, h, w) for n in "qkv")
    if f"{variant}.cache_k" in inp:  # cached windows [n, 128, dim], oldest first
        d = q.shape[-1]
        k = torch.cat([inp[f"{variant}.cache_k"].reshape(1, -1, heads, d), k], 1)
        val = torch.cat([inp[f"{variant}.cache_v"].reshape(1, -1, heads, d), val], 1)
    return cj, c, v, (f, h, w), q, k, val, out


@pytest.mark.parametrize("variant", variants())
def test_local_mask_and_topk_budget(variant):
    if variant is None:
        case_json(CASE)
    cj, c, v, (f, h, w), *_, out = load(variant)
    local = local_window_mask(h // 8, w // 8, c["local_range"])
    assert torch.equal(local, out[f"{variant}.local_attn_mask"])
    assert topk_blocks(v["topk_ratio"], h, w) == v["topk"]


@pytest.mark.parametrize("variant", variants())
def test_draft_mask_matches_golden_exactly(variant):
    if variant is None:
        case_json(CASE)
    cj, c, v, (f, h, w), q, k, _, out = load(variant)
    mask = draft_block_mask(q, k, local_window_mask(h // 8, w // 8, c["local_range"]), v["topk"])
    assert torch.equal(mask, out[f"{variant}.block_mask"])


@pytest.mark.parametrize("variant", variants())
def test_masked_attention_matches_golden(variant):
    if variant is None:
        case_json(CASE)
    cj, c, v, (f, h, w), q, k, val, out = load(variant)
    got = from_windows(masked_attention(q, k, val, out[f"{variant}.block_mask"]), f, h, w).flatten(2)
    tol = cj["tolerance"][variant]
    torch.testing.assert_close(got, out[f"{variant}.attn_out"], atol=tol["atol"], rtol=tol["rtol"])


def test_windows_roundtrip_and_order():
    f, h, w = 4, 16, 8
    x = torch.arange(f * h * w).view(1, -1, 1, 1).float()
    y = to_windows(x, f, h, w)
    assert torch.equal(from_windows(y, f, h, w), x)
    # window 1 = time block 0, window row 1, col 0: first token is (t=0, row 8, col 0)
    assert y[0, BLOCK, 0, 0] == 8 * w


def _brute_mask(q, k, local, topk):
    """Loops over heads and query temporal blocks, a sort instead of topk."""
    b, _, nh, d = q.shape
    qm = q.unflatten(1, (-1, BLOCK)).mean(2)
    km = k.unflatten(1, (-1, BLOCK)).mean(2)
    nw, nq, nk = local.shape[0], qm.shape[1], km.shape[1]
    out = torch.zeros(b, nh, nq, nk, dtype=torch.bool)
    for bi in range(b):
        for hd in range(nh):
            s = qm[bi, :, hd] @ km[bi, :, hd].T / math.sqrt(d)
            for i in range(nq):
                for j in range(nk):
                    if not local[i % nw, j % nw]:
                        s[i, j] = -math.inf
            p = torch.softmax(s, -1)
            for t in range(nq // nw):
                rows = p[t * nw:(t + 1) * nw].flatten()
                kk = min(rows.numel() - 1, topk)
                thr = sorted(rows.tolist(), reverse=True)[kk]
                out[bi, hd, t * nw:(t + 1) * nw] = (rows > thr).view(nw, nk)
    return out


@pytest.mark.parametrize("local_range,topk", [(3, 5), (2, 40), (5, 3)])
def test_draft_mask_equals_brute_force(local_range, topk):
    g = torch.Generator().manual_seed(local_range)
    f, h, w, nh, d = 4, 24, 16, 2, 8
    q = torch.randn(2, f * h * w, nh, d, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3 * f * h * w // 2, nh, d, generator=g, dtype=torch.float64)
    local = local_window_mask(h // 8, w // 8, local_range)
    assert torch.equal(draft_block_mask(q, k, local, topk), _brute_mask(q, k, local, topk))


def test_local_mask_is_not_clamped_at_borders():
    m = local_window_mask(4, 4, 3)
    assert m[0].sum() == 4 and m[5].sum() == 9        # corner sees 2x2, interior 3x3
    even = local_window_mask(1, 6, 4)                 # even range: 2 left, 1 right
    assert even[3].nonzero().flatten().tolist() == [1, 2, 3, 4]


def test_empty_query_block_gives_zero():
    q, k, v = (torch.randn(1, 2 * BLOCK, 1, 8) for _ in range(3))
    mask = torch.tensor([[[[False, False], [True, False]]]])
    out = masked_attention(q, k, v, mask)
    assert torch.equal(out[:, :BLOCK], torch.zeros_like(out[:, :BLOCK]))
    ref = torch.softmax(q[0, BLOCK:, 0] @ k[0, :BLOCK, 0].T / math.sqrt(8), -1) @ v[0, :BLOCK, 0]
    torch.testing.assert_close(out[0, BLOCK:, 0], ref)
