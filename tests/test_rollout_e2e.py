"""End-to-end autoregressive rollouts: the real causal DiT inside the block sampler.

(B) parity: for every variant of the Self-Forcing / Causal-Forcing goldens, the case's
weights run in ``WanDiT`` behind ``CausalDenoiser`` (what ``ar.sampler`` uses) with a
``SelfKVCache`` sized from the case and the recorded re-noise draws ``draw.k`` injected;
every model input the rollout produces must match the recorded one and the final latents
the recorded ones. Nothing is teacher-forced: errors would compound block to block.

Long run: 1,000 blocks of a tiny model through the engine with an attention sink and a
sliding window must hold memory and per-block time flat.
"""
from __future__ import annotations

import gc
import os
import textwrap
import time
from statistics import median

import pytest
import torch

import engine
from goldens import case_json, case_value, tensors, variant_params
from nodes.ar import ARRollout, ARSchedule
from nodes.samplers import FlowMatchTable
from nodes.wan.config import WanConfig
from nodes.wan.causal import CausalDenoiser
from nodes.wan.dit import WanDiT
from nodes.common.kv_cache import SelfKVCache

CASES = ("causal_selfforcing", "causal_forcing_framewise", "causal_forcing_i2v")


def _tol(v, name):
    t = v["tolerance"][name]
    return dict(atol=t["atol"], rtol=t["rtol"])


@pytest.mark.parametrize("case,vname", variant_params(CASES))
def test_rollout_with_the_real_dit_matches_upstream(case, vname):
    cj = case_json(case)
    if vname is None:
        pytest.skip(f"{case} has no variants")
    v = cj["variants"][vname]
    inputs, record = tensors(case, cj["files"]["inputs"]), tensors(case, v["record_file"])
    sd = tensors(case, cj["weights"]["file"])
    model = WanDiT(WanConfig.from_config_json(cj["model_kwargs"], sd))
    model.load_state_dict(sd, strict=True)
    model.eval().requires_grad_(False)

    noise, image = inputs["noise"], inputs.get("initial_latent")
    prefix = 0 if image is None else image.shape[1]
    _, ph, pw = model.cfg.patch_size
    frame_tokens = (noise.shape[-2] // ph) * (noise.shape[-1] // pw)
    local = case_value(cj, v, "local_attn_size", -1)
    cache = SelfKVCache(model.cfg.num_layers, model.cfg.num_heads, model.cfg.head_dim, frame_tokens,
                        sink_frames=case_value(cj, v, "sink_size", 0), window_frames=None if local == -1 else local,
                        max_frames=prefix + noise.shape[1], batch_size=noise.shape[0])
    assert cache.k.shape[2] == v["kv_cache_tokens"]
    with torch.no_grad():
        den = CausalDenoiser(model, cache, model.prepare_cross(inputs["prompt_embeds"]), graphs=False)
    seen = []

    def denoise(x, t, frame_start):
        seen.append(x.clone())
        with torch.no_grad():
            return den(x, t, frame_start)

    schedule = ARSchedule.build(FlowMatchTable(case_value(cj, v, "timestep_shift")), case_value(cj, v, "denoising_step_list"),
                                first_chunk_steps=case_value(cj, v, "denoising_step_list_first_chunk"),
                                warp=case_value(cj, v, "warp_denoising_step", True),
                                context_noise=case_value(cj, v, "context_noise", 0))
    draws = [record[f"draw.{k}"] for k in range(v["num_draws"])]
    roll = ARRollout(denoise, schedule, case_value(cj, v, "num_frame_per_block"), noise, initial_latent=image,
                     draws=draws)
    out = roll.run_all()

    assert len(seen) == v["num_calls"] and roll.num_draws == v["num_draws"]
    for i, x in enumerate(seen):  # every re-noised input (and each block's noise / context input)
        torch.testing.assert_close(x, record[f"call.{i}.input"].to(x.dtype), **_tol(v, "per_call_x0_pred"),
                                   msg=lambda m: f"call {i} input: {m}")
    torch.testing.assert_close(out, record["final_latents"], **_tol(v, "final_latents"))


# --------------------------------------------------------------------------- 1,000 blocks

LONG_SPEC = """\
name: long_tiny
inputs: {prompt: "a long walk", seed: 0, num_blocks: 1000}
nodes:
  text:
    type: wan.text_encoder
    in: {prompt: inputs.prompt}
    params: {checkpoint: random, tokenizer: bytes, text_len: 8, dim: 8, ffn_dim: 8, num_heads: 1, head_dim: 8,
             num_layers: 1, vocab_size: 260, dtype: fp32}
    device: cpu
  dit:
    type: wan.dit
    params: {checkpoint: random, dim: 16, ffn_dim: 16, num_heads: 2, num_layers: 1, text_dim: 8, text_len: 8,
             in_dim: 4, out_dim: 4, dtype: fp32}
    device: cpu
  sampler:
    type: ar.sampler
    in: {model: dit.model, text: text.embeds, seed: inputs.seed}
    params: {steps: [1000, 500], frames_per_block: 1, latent_channels: 4, latent_height: 2, latent_width: 2,
             num_blocks: 1000, sink_frames: 1, window_frames: 4, rope_mode: relative}
    device: cpu
"""


def _tensor_bytes(root) -> int:
    """Bytes of every distinct tensor storage reachable from ``root`` (dataclasses, dicts, lists, objects)."""
    seen_obj, seen_storage, total = set(), set(), 0
    stack = [root]
    while stack:
        o = stack.pop()
        if id(o) in seen_obj or o is None or isinstance(o, (str, int, float, bool, type)) or callable(o) and \
                not hasattr(o, "__dict__"):
            continue
        seen_obj.add(id(o))
        if isinstance(o, torch.Tensor):
            key = o.untyped_storage().data_ptr()
            if key not in seen_storage:
                seen_storage.add(key)
                total += o.untyped_storage().nbytes()
        elif isinstance(o, torch.nn.Module):
            stack.extend(o.parameters())
            stack.extend(o.buffers())
        elif isinstance(o, dict):
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set)):
            stack.extend(o)
        elif hasattr(o, "__dict__"):
            stack.extend(vars(o).values())
    return total


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc for the resident set size")
def test_thousand_blocks_with_sink_and_window_stay_flat(tmp_path):
    spec = tmp_path / "long_tiny.yaml"
    spec.write_text(textwrap.dedent(LONG_SPEC))
    pipe = engine.load(str(spec)).load()
    times, mem = [], {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster, and idle OpenMP workers would spin on the clock
    try:
        _run_long(pipe, times, mem)
    finally:
        torch.set_num_threads(threads)
    (state50, rss50), (state1000, rss1000) = mem[50], mem[1000]
    assert abs(state1000 - state50) <= max(0.01 * state50, 64 * 1024), (state50, state1000)
    assert rss1000 - rss50 < 32 * 2**20, (rss50, rss1000)
    early, late = median(times[50:150]), median(times[900:1000])
    assert late <= 1.5 * early, (early, late)


def _run_long(pipe, times: list, mem: dict) -> None:
    with pipe.open_session() as s:
        for b in range(1000):
            t0 = time.process_time()  # CPU time of this process: not skewed by other processes on the machine
            s.step()
            times.append(time.process_time() - t0)
            if b + 1 in (50, 1000):
                gc.collect()
                st = s.states["sampler"]
                mem[b + 1] = (_tensor_bytes(st), _rss_bytes())
        st = s.states["sampler"]
        assert st.rollout.block_index == 1000 and st.noise is None
        assert st.stream.cache.k.shape[2] == 4 * st.stream.cache.frame_tokens
        assert torch.isfinite(s.values["sampler"]["latent"]).all()
