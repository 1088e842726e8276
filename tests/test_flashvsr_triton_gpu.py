"""The compiled Triton block-sparse kernel on CUDA against the dense masked reference (skipped without CUDA;
benchmarks/device_flashvsr.sh runs it). float32 inputs take IEEE dots: tight; bf16: the reference is the float32
formula on the same bf16 inputs, the budget covers bf16 P and output rounding."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton")

from goldens import case_json, tensors  # noqa: E402

from nodes.flashvsr.sparse_attention import (BLOCK, draft_block_mask, from_windows, local_window_mask,  # noqa: E402
                                             masked_attention, to_windows)
from nodes.flashvsr.sparse_triton import sparse_attention  # noqa: E402

SHAPES = [  # (batch, query blocks, key blocks, heads, head dim, density)
    (1, 2, 8, 12, 128, 0.25), (1, 6, 24, 4, 128, 0.5), (2, 3, 5, 3, 64, 0.7), (1, 2, 3, 2, 20, 0.5),
    (1, 4, 4, 2, 128, 1.0), (1, 3, 6, 2, 128, 0.05)]


def _inputs(b, nq, nk, heads, d, density, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, nq * BLOCK, heads, d, generator=g, device="cuda").to(dtype)
    k, v = (torch.randn(b, nk * BLOCK, heads, d, generator=g, device="cuda").to(dtype) for _ in range(2))
    mask = torch.rand(b, heads, nq, nk, generator=g, device="cuda") < density
    mask[0, 0, 0] = False   # one empty query block: output 0
    return q, k, v, mask


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 2e-5, 1e-4), (torch.bfloat16, 2e-2, 2e-2)],
                         ids=["fp32", "bf16"])
def test_kernel_equals_masked_reference_on_cuda(shape, dtype, atol, rtol):
    q, k, v, mask = _inputs(*shape, dtype)
    got = sparse_attention(q, k, v, mask)
    ref = masked_attention(q.float(), k.float(), v.float(), mask)
    torch.testing.assert_close(got.float(), ref, atol=atol, rtol=rtol)
    assert torch.count_nonzero(got[0, :BLOCK, 0]) == 0


def test_draft_mask_and_kernel_match_the_sparse_golden_on_cuda():
    cj = case_json("flashvsr_sparse_attn")
    inp, out = tensors("flashvsr_sparse_attn", "inputs.safetensors"), tensors("flashvsr_sparse_attn",
                                                                               "outputs.safetensors")
    c = cj["config"]
    for name, v in c["variants"].items():
        f, h, w, heads = v["f"], c["h"], c["w"], c["num_heads"]
        q, k, val = (to_windows(inp[f"{name}.{n}"].cuda().unflatten(-1, (heads, -1)), f, h, w) for n in "qkv")
        if f"{name}.cache_k" in inp:
            d = q.shape[-1]
            k = torch.cat([inp[f"{name}.cache_k"].cuda().reshape(1, -1, heads, d), k], 1)
            val = torch.cat([inp[f"{name}.cache_v"].cuda().reshape(1, -1, heads, d), val], 1)
        mask = draft_block_mask(q, k, local_window_mask(h // 8, w // 8, c["local_range"], device="cuda"), v["topk"])
        assert torch.equal(mask.cpu(), out[f"{name}.block_mask"])
        got = from_windows(sparse_attention(q, k, val, mask), f, h, w).flatten(2).cpu()
        tol = cj["tolerance"][name]
        torch.testing.assert_close(got, out[f"{name}.attn_out"], atol=tol["atol"], rtol=tol["rtol"])


def test_dit_golden_through_the_kernel_on_cuda():
    """Every call of the streaming DiT golden with the Triton kernel (fp32, IEEE dots) on the GPU."""
    from nodes.flashvsr.config import call_frame_start
    from nodes.flashvsr.dit import FlashVSRDiT, WindowKVCache
    from nodes.wan.config import WanConfig
    case = "flashvsr_dit_step"
    cj = case_json(case)
    sd = tensors(case, cj["files"]["weights"])
    cfg = WanConfig.from_state_dict(sd, num_heads=cj["model_kwargs"]["num_heads"], text_len=cj["config"]["ctx_len"])
    model = FlashVSRDiT(cfg)
    model.load_state_dict(sd, strict=True)
    model = model.cuda().eval()
    inp, out = tensors(case, cj["files"]["inputs"]), tensors(case, cj["files"]["outputs"])
    c, tol = cj["config"], cj["tolerance"]
    cross, tt = model.prepare_prompt(inp["context"].cuda()), model.embed_time(inp["timestep"].cuda())
    cache = WindowKVCache(len(model.blocks), int(c["kv_ratio"]))
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for i, (a, b) in enumerate(c["latent_slices"]):
            lq = [inp[f"call.{i}.lq_latents.{l}"].cuda() for l in range(c["lq_layers"])]
            with torch.no_grad():
                flow = model.chunk(inp["noise"][:, :, a:b].cuda(), cross, tt, call_frame_start(i), cache, lq,
                                   kernel="triton", local_range=c["local_range"], topk_ratio=c["topk_ratio"])
            torch.testing.assert_close(flow.cpu(), out[f"call.{i}.noise_pred"], atol=tol["atol"], rtol=tol["rtol"])
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
