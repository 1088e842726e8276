"""FlashVSR streaming DiT parity (golden ``flashvsr_dit_step``): every call's flow, every call/layer's block mask,
the window cache rule; plus the dense path and the stream's chunk contract."""
import pytest
import torch
from goldens import case_json, optional_tensors, tensors

from nodes.flashvsr import dit as dit_mod
from nodes.flashvsr.config import StreamSettings, call_frame_start
from nodes.flashvsr.dit import FlashVSRDiT, WindowKVCache
from nodes.flashvsr.lq_proj import LQProjConfig, LQProjector
from nodes.flashvsr.sparse_attention import WINDOW
from nodes.flashvsr.stream import FlashVSRModel
from nodes.wan.config import WanConfig

CASE = "flashvsr_dit_step"


@pytest.fixture(scope="module")
def case():
    cj = case_json(CASE)
    sd = tensors(CASE, cj["files"]["weights"])
    cfg = WanConfig.from_state_dict(sd, num_heads=cj["model_kwargs"]["num_heads"], text_len=cj["config"]["ctx_len"])
    model = FlashVSRDiT(cfg)
    model.load_state_dict(sd, strict=True)
    return cj, model.eval(), tensors(CASE, cj["files"]["inputs"]), tensors(CASE, cj["files"]["outputs"])


def replay(cj, model, inputs, mode="sparse", collect=True):
    c = cj["config"]
    cross, time_terms = model.prepare_prompt(inputs["context"]), model.embed_time(inputs["timestep"])
    cache = WindowKVCache(len(model.blocks), int(c["kv_ratio"]))
    results = []
    for i, (a, b) in enumerate(c["latent_slices"]):
        lq = [inputs[f"call.{i}.lq_latents.{l}"] for l in range(c["lq_layers"])]
        masks = [] if collect else None
        with torch.no_grad():
            flow = model.chunk(inputs["noise"][:, :, a:b], cross, time_terms, call_frame_start(i), cache, lq,
                               attention_mode=mode, kernel="masked", local_range=c["local_range"],
                               topk_ratio=c["topk_ratio"], masks=masks)
        results.append((flow, masks, cache.k[0].shape[1] // (WINDOW[0] * WINDOW[1] * WINDOW[2])))
    return results


def test_config_read_from_weights(case):
    cj, model, _, _ = case
    mk = cj["model_kwargs"]
    for k in ("dim", "in_dim", "ffn_dim", "out_dim", "text_dim", "freq_dim", "num_heads", "num_layers"):
        assert getattr(model.cfg, k) == mk[k], k
    assert list(model.cfg.patch_size) == mk["patch_size"]


def test_call_frame_starts_follow_the_latent_slices(case):
    cj = case[0]
    assert [call_frame_start(i) for i in range(len(cj["config"]["latent_slices"]))] == \
        [a for a, _ in cj["config"]["latent_slices"]]


def test_every_call_matches_golden(case):
    cj, model, inputs, outputs = case
    debug = optional_tensors(CASE, "debug", cj["files"])
    tol = cj["tolerance"]
    windows_after = cj["checks"].get("kv_cache_windows_after_call")
    for i, (flow, masks, windows) in enumerate(replay(cj, model, inputs)):
        torch.testing.assert_close(flow, outputs[f"call.{i}.noise_pred"], atol=tol["atol"], rtol=tol["rtol"])
        if debug is not None:
            for layer, mask in enumerate(masks):
                assert torch.equal(mask, debug[f"call.{i}.layer.{layer}.block_mask"]), (i, layer)
        if windows_after is not None:
            assert windows == windows_after[i]


def test_dense_mode_equals_an_all_true_mask(case, monkeypatch):
    """attention: dense is full attention over cache + chunk, i.e. the sparse path with every block kept."""
    cj, model, inputs, _ = case
    dense = replay(cj, model, inputs, mode="dense", collect=False)
    monkeypatch.setattr(dit_mod, "draft_block_mask",
                        lambda q, k, local, topk: torch.ones(q.shape[0], q.shape[2], q.shape[1] // 128,
                                                             k.shape[1] // 128, dtype=torch.bool))
    full = replay(cj, model, inputs, mode="sparse", collect=False)
    for (a, _, _), (b, _, _) in zip(dense, full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_window_cache_drops_one_temporal_block_per_call():
    cache = WindowKVCache(1, kv_len=1)
    held = []
    for frames_blocks in (3, 1, 1):
        k = torch.zeros(1, frames_blocks * 4, 1, 2)
        keys, _ = cache.attend(0, k, k, block_tokens=4)
        held.append((keys.shape[1] // 4, cache.k[0].shape[1] // 4))
    assert held == [(3, 2), (3, 2), (3, 2)]   # upstream drops ONE block per call, not down to kv_len


def _tiny_model(case):
    cj, dit, inputs, _ = case
    g = torch.Generator().manual_seed(0)
    proj = LQProjector(LQProjConfig(hidden1=8, hidden2=8, out_dim=dit.cfg.dim, layer_num=1))
    for p in proj.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05
    return FlashVSRModel(dit, proj, inputs["context"][0])


def test_stream_step_is_noise_minus_flow_and_counts_frames(case):
    cj, dit, inputs, _ = case
    model = _tiny_model(case)
    _, _, _, h, w = inputs["noise"].shape
    lq = torch.rand(1, 3, 25 + 8, h * 8, w * 8) * 2 - 1
    settings = StreamSettings(kernel="masked", local_range=3)
    a, b = model.open_stream(settings), model.open_stream(settings)
    noise0, noise1 = inputs["noise"][:, :, :6], inputs["noise"][:, :, 6:8]
    x0 = a.step(noise0, lq[:, :, :25])
    flow = b.flow(noise0, b.lq.project(lq[:, :, :25]))
    torch.testing.assert_close(x0, noise0 - flow)
    assert a.lq_frames_wanted() == 8 and a.latent_frames_next() == 2
    with pytest.raises(ValueError, match="takes 8 LQ frames"):
        a.step(noise1, lq[:, :, :25])
    with pytest.raises(ValueError, match="takes 2 latent frames"):
        a.step(inputs["noise"][:, :, :4], lq[:, :, 25:33])
    assert a.step(noise1, lq[:, :, 25:33]).shape == noise1.shape


def test_mismatched_parts_are_refused(case):
    cj, dit, inputs, _ = case
    proj = LQProjector(LQProjConfig(hidden1=8, hidden2=8, out_dim=dit.cfg.dim + 1, layer_num=1))
    with pytest.raises(ValueError, match="LQ projector outputs"):
        FlashVSRModel(dit, proj, inputs["context"][0])
    proj = LQProjector(LQProjConfig(hidden1=8, hidden2=8, out_dim=dit.cfg.dim, layer_num=1))
    with pytest.raises(ValueError, match="prompt embedding"):
        FlashVSRModel(dit, proj, torch.zeros(4, dit.cfg.text_dim + 1))
