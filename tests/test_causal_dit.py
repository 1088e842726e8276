"""Causal (KV-cached) Wan DiT vs Self-Forcing / Causal-Forcing records, teacher-forced.

Every generator call of the recorded rollout is replayed in order with our own
caches, fed the recorded input / timestep / current_start; flow and x0 must match
per call, and (local window) the final KV cache rows in upstream order.
"""

import pytest
import torch
from goldens import case_json, case_value, tensors, variant_params

from nodes.wan.config import WanConfig
from nodes.wan.dit import WanDiT
from nodes.common.kv_cache import SelfKVCache

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def flow_match_sigma(t: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma(t) as upstream: FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)
    .set_timesteps(1000, training=True), looked up by argmin |timesteps - t|, float64."""
    s = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = shift * s / (1 + (shift - 1) * s)
    timesteps = (sigmas * 1000).double()
    idx = (timesteps[None] - t.double().flatten()[:, None]).abs().argmin(dim=1)
    return sigmas.double()[idx].view(t.shape)


def _load(case: str) -> tuple[dict, WanDiT]:
    cj = case_json(case)
    sd = tensors(case, cj["weights"]["file"])
    model = WanDiT(WanConfig.from_config_json(cj["model_kwargs"], sd))
    model.load_state_dict(sd, strict=True)
    return cj, model.eval()


def _replay(case: str, variant: str, shift: float):
    cj, model = _load(case)
    var = cj["variants"][variant]
    rec = tensors(case, var["record_file"])
    calls = var["calls"]
    cfg = model.cfg
    _, f0, _, h, w = rec["call.0.input"].shape
    frame_tokens = (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    recorded = cj.get("frame_tokens", cj.get("shapes", {}).get("frame_tokens"))
    assert recorded is None or frame_tokens == recorded
    total_frames = max(int(rec[f"call.{c['index']}.current_start"]) // frame_tokens
                       + rec[f"call.{c['index']}.input"].shape[1] for c in calls)
    local = case_value(cj, var, "local_attn_size", -1)
    cache = SelfKVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim, frame_tokens,
                        sink_frames=case_value(cj, var, "sink_size", 0), window_frames=None if local == -1 else local,
                        max_frames=total_frames)
    assert cache.k.shape[2] == var["kv_cache_tokens"]
    prompt = tensors(case, cj["files"]["inputs"])["prompt_embeds"]
    cross = model.prepare_cross(prompt)
    tol = var["tolerance"]
    frame_end = 0
    for c in calls:
        i = c["index"]
        x, t = rec[f"call.{i}.input"], rec[f"call.{i}.timestep"]
        frame = int(rec[f"call.{i}.current_start"]) // frame_tokens
        assert frame == c["current_start_frame"]
        with torch.no_grad():
            flow = model.forward_causal(x, t, cross, cache, frame)
        ft = tol["per_call_flow_pred"]
        torch.testing.assert_close(flow, rec[f"call.{i}.flow_pred"], atol=ft["atol"], rtol=ft["rtol"],
                                   msg=lambda m: f"call {i} flow: {m}")
        sigma = flow_match_sigma(t, shift)[..., None, None, None]
        x0 = (x.double() - sigma * flow.double()).float()
        xt = tol["per_call_x0_pred"]
        torch.testing.assert_close(x0, rec[f"call.{i}.x0_pred"], atol=xt["atol"], rtol=xt["rtol"],
                                   msg=lambda m: f"call {i} x0: {m}")
        frame_end = max(frame_end, frame + x.shape[1])
    return rec, cache, frame_end, tol


@pytest.mark.parametrize("case,variant", variant_params(["causal_selfforcing", "causal_forcing_framewise",
                                                          "causal_forcing_i2v"]))
def test_teacher_forced(case, variant):
    """Every variant the case files list; where a record holds upstream's final KV cache (a local
    window), our cache's rows in upstream's order must match it too."""
    cj = case_json(case)
    var = cj["variants"][variant]
    rec = tensors(case, var["record_file"])
    image = "initial_latent" in tensors(case, cj["files"]["inputs"])
    assert (var["calls"][0]["kind"] == "image") == image
    if image:
        assert rec["call.0.timestep"].dtype == torch.int64  # the image pass, as upstream
    rec, cache, frame_end, tol = _replay(case, variant, case_value(cj, var, "timestep_shift"))
    ft = tol["per_call_flow_pred"]
    kv_layers = sorted({int(k.split(".")[1]) for k in rec if k.startswith("kv_cache.")})
    assert kv_layers in ([], list(range(cache.num_layers)))
    for layer in kv_layers:
        k, v = cache.chronological(layer, frame_end)
        for name, mine in (("k", k), ("v", v)):
            gold = rec[f"kv_cache.{layer}.{name}"]
            torch.testing.assert_close(mine, gold, atol=ft["atol"], rtol=ft["rtol"])


def _random_model(seed=0, **kw) -> WanDiT:
    torch.manual_seed(seed)
    cfg = WanConfig(**{**dict(text_len=8, in_dim=4, dim=32, ffn_dim=48, text_dim=8, out_dim=4, num_heads=2,
                              num_layers=2), **kw})
    m = WanDiT(cfg).eval()
    with torch.no_grad():
        m.head.head.weight.normal_(0, 0.2)
    return m


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_block_written_once_equals_bidirectional_forward(model_type):
    """One block at frame 0 on an empty cache sees only itself = the bidirectional model."""
    m = _random_model(model_type=model_type)
    x, ctx = torch.randn(1, 3, 4, 4, 6), torch.randn(1, 5, 8)
    t = torch.tensor([[700.0, 700.0, 700.0]])
    clip, y = (torch.randn(1, 257, 1280), torch.randn(1, 3, 2, 4, 6)) if model_type == "i2v" else (None, None)
    if model_type == "i2v":  # i2v in_dim covers x and y channels
        m = _random_model(model_type=model_type, in_dim=6)
    cache = SelfKVCache(2, 2, 16, 6, max_frames=3)
    with torch.no_grad():
        causal = m.forward_causal(x, t, m.prepare_cross(ctx, clip), cache, 0, y=y)
        bidir = m(x.transpose(1, 2), t[:, 0], ctx, clip_fea=clip, y=None if y is None else y.transpose(1, 2))
    torch.testing.assert_close(causal, bidir.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_prompt_switch_keeps_self_cache():
    m = _random_model()
    cache = SelfKVCache(2, 2, 16, 6, max_frames=4)
    x, t = torch.randn(1, 2, 4, 4, 6), torch.full((1, 2), 500.0)
    with torch.no_grad():
        m.forward_causal(x, t, m.prepare_cross(torch.randn(1, 5, 8)), cache, 0)
        before = cache.k.clone()
        other = m.prepare_cross(torch.randn(1, 7, 8))
        assert torch.equal(cache.k, before)
        out = m.forward_causal(x, t, other, cache, 2)
    assert torch.isfinite(out).all() and not torch.equal(cache.k[:, :, 12:], before[:, :, 12:])


def test_ring_keeps_upstream_frame_set():
    """Sink frames stay, the newest window frames are kept, oldest non-sink evicted."""
    cache = SelfKVCache(1, 1, 4, 2, sink_frames=1, window_frames=5)
    for start in range(0, 12, 2):
        plan = cache.plan(start, 2)
        tag = torch.arange(start, start + 2).repeat_interleave(2).float().view(1, 4, 1, 1).expand(1, 4, 1, 4)
        cache.write(0, plan, tag, tag)
        k, _ = cache.chronological(0, start + 2)
        frames = k[0, ::2, 0, 0].tolist()
        end = start + 2
        assert frames == [0.0] + [float(f) for f in range(max(1, end - 4), end)]
        assert plan.attend_rows == min(end, 5) * 2
    with pytest.raises(ValueError):
        cache.plan(12, 5)  # a block larger than the window: upstream crashes too
