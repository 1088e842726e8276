"""The Triton block-sparse kernel against the dense masked path, on the CPU through TRITON_INTERPRET=1
(tiny shapes). Skipped without triton (CI) and on CUDA machines, where tests/test_flashvsr_triton_gpu.py runs
the compiled kernel instead (the interpreter is a process-wide switch)."""
import importlib
import importlib.util
import os
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip("CUDA present: tests/test_flashvsr_triton_gpu.py covers the compiled kernel", allow_module_level=True)
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("triton was imported without TRITON_INTERPRET=1 in this process", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # triton reads it on import: set before importing it
from nodes.flashvsr.sparse_attention import BLOCK, block_sparse_attention, masked_attention  # noqa: E402
from nodes.flashvsr.sparse_triton import kept_blocks, sparse_attention  # noqa: E402


@pytest.mark.parametrize("b,nq,nk,heads,d,density", [(1, 2, 3, 2, 8, 0.5), (2, 1, 4, 3, 20, 0.3),
                                                     (1, 2, 2, 1, 64, 1.0), (1, 1, 3, 2, 16, 0.0)])
def test_kernel_equals_masked_reference(b, nq, nk, heads, d, density):
    g = torch.Generator().manual_seed(nq * 10 + nk)
    q = torch.randn(b, nq * BLOCK, heads, d, generator=g)
    k, v = (torch.randn(b, nk * BLOCK, heads, d, generator=g) for _ in range(2))
    mask = torch.rand(b, heads, nq, nk, generator=g) < density
    if density > 0:
        mask[0, 0, 0] = False  # an empty query block
    got = sparse_attention(q, k, v, mask)
    torch.testing.assert_close(got, masked_attention(q, k, v, mask), atol=2e-6, rtol=1e-5)
    assert torch.equal(got[0, :BLOCK, 0], torch.zeros(BLOCK, d))


def test_strided_inputs_and_dispatch():
    """q/k/v as views of one fused [B, L, 3, H, D] tensor (non-contiguous heads), through the dispatcher."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(1, 2 * BLOCK, 3, 2, 16, generator=g)
    q, k, v = qkv.unbind(2)
    mask = torch.tensor([[[[True, False], [True, True]], [[False, True], [False, False]]]])
    got = block_sparse_attention(q, k, v, mask, kernel="triton")
    torch.testing.assert_close(got, masked_attention(q, k, v, mask), atol=2e-6, rtol=1e-5)


def test_kept_blocks_lists_mask_in_order():
    mask = torch.tensor([[[[False, True, False, True], [False, False, False, False]]]])
    index, count = kept_blocks(mask)
    assert count.tolist() == [[[2, 0]]] and index[0, 0, 0, :2].tolist() == [1, 3]


def test_bad_shapes():
    q = torch.randn(1, 100, 1, 8)
    with pytest.raises(ValueError, match="multiples of 128"):
        sparse_attention(q, q, q, torch.ones(1, 1, 1, 1, dtype=torch.bool))
    q = torch.randn(1, BLOCK, 1, 8)
    with pytest.raises(ValueError, match="does not fit"):
        sparse_attention(q, q, q, torch.ones(1, 2, 1, 1, dtype=torch.bool))


def test_half_precision_path():
    """The tensor-core path (P cast to the input dtype, no IEEE flag), in fp16: the interpreter's bf16 dot is
    wrong (numpy has no bfloat16), so bf16 is checked on the GPU (tests/test_flashvsr_triton_gpu.py)."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2 * BLOCK, 2, 32, generator=g).half()
    k, v = (torch.randn(1, 3 * BLOCK, 2, 32, generator=g).half() for _ in range(2))
    mask = torch.rand(1, 2, 2, 3, generator=g) < 0.6
    got = sparse_attention(q, k, v, mask)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), masked_attention(q.float(), k.float(), v.float(), mask),
                               atol=2e-3, rtol=2e-3)
