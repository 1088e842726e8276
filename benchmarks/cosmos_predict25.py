"""Issue 17's numbers: Cosmos-Predict2.5-2B at full size on one GPU, random weights, bf16.

1280x720, 93 frames = 24 latent frames of 90x160 = 86,400 tokens (2x2 patches). Measured with CUDA events
(median after warmup):
- one DiT forward (batch 1), CFG as two forwards and as one batch-2 forward, one FlowUniPC step;
- ms per sampling step = the faster CFG form + the UniPC step; the projected 35-step video = upstream's 36
  model calls (Karras flow schedule: N + 1 calls) x that + the VAE decode (text encoding not included);
- the Wan 2.1 VAE decode of the 24 latent frames (chunk 1, channels-last);
- achieved TFLOP/s per forward: matmul + attention FLOPs counted in closed form (checked here against
  torch's FlopCounterMode on a small shape), and the roofline floor from ceilings measured in the same run
  (bf16 matmul at the MLP's shape, SDPA at the self-attention's shape): floor / measured = the fraction of
  the attention/matmul ceiling reached;
- peak memory of the sampling loop, with Cosmos-Reason1-7B (random, bf16) loaded, used for both prompts and
  then offloaded to host memory first (the pipeline's order), and of the decode.

  python -m benchmarks.cosmos_predict25            # on a GPU (~3 min on an H100)
  python -m benchmarks.cosmos_predict25 --dry      # tiny sizes on the CPU: the same code paths
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import median_ms
from nodes.checkpoint import random_init
from nodes.common.attention import attention
from nodes.cosmos.config import CosmosConfig
from nodes.cosmos.flow_video2world import FlowVideo2World, flow_schedule
from nodes.cosmos.model import CosmosDiT
from nodes.samplers.unipc import FlowUniPC

FULL = dict(cfg=dict(model_channels=2048, num_blocks=28, num_heads=16, crossattn_emb_channels=1024,
                     crossattn_proj_in_channels=28 * 3584, adaln_lora_dim=256, timestep_scale=0.001,
                     rope_h_extrapolation_ratio=3.0, rope_w_extrapolation_ratio=3.0),
            latent=(24, 90, 160), text_len=512,
            reason1=dict(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                         vocab_size=152064))
DRY = dict(cfg=dict(model_channels=64, num_blocks=2, num_heads=4, crossattn_emb_channels=32,
                    crossattn_proj_in_channels=2 * 32, adaln_lora_dim=8, timestep_scale=0.001),
           latent=(3, 8, 12), text_len=16,
           reason1=dict(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                        vocab_size=400))
CALLS = 36   # 35 steps over the Karras flow schedule = 36 model calls (upstream's use_kerras_sigma)


def timed(fn, reps: int, warmup: int, dev) -> float:
    return median_ms(fn, reps, warmup, dev.type == "cuda")


def forward_flops(cfg: CosmosConfig, tokens: int, text_len: int, batch: int = 1) -> dict:
    """Matmul and attention FLOPs of one DiT forward with the text K/V precomputed (prepare_cross, once per
    prompt): per block q/k/v/o of self-attention, q/o of cross-attention, the 4x MLP; QK^T and PV of both
    attentions; patch embedding and final layer. AdaLN / time MLP are per frame (negligible)."""
    d, L = cfg.model_channels, tokens
    lin = 2 * L * (4 * d * d + 2 * d * d + 2 * d * cfg.mlp_dim)
    attn_self, attn_cross = 4 * L * L * d, 4 * L * text_len * d
    ends = 2 * L * d * (cfg.in_channels_total * cfg.patch_volume + cfg.out_channels * cfg.patch_volume)
    return {"matmul": batch * (cfg.num_blocks * lin + ends), "attention": batch * cfg.num_blocks * attn_self,
            "cross_attention": batch * cfg.num_blocks * attn_cross}


def counted_flops(model, x, t, cross) -> float:
    with FlopCounterMode(display=False) as fc:
        model(x, t, cross=cross)
    return float(fc.get_total_flops())


def ceilings(cfg: CosmosConfig, tokens: int, dev, dtype, reps: int) -> dict:
    """Measured here: bf16 matmul at the MLP's first layer shape, SDPA (fd's attention entry) at the
    self-attention's shape."""
    d, h = cfg.model_channels, cfg.num_heads
    a = torch.randn(tokens, d, device=dev, dtype=dtype)
    w = torch.randn(d, cfg.mlp_dim, device=dev, dtype=dtype)
    ms = timed(lambda: a @ w, reps, 2, dev)
    mm = 2 * tokens * d * cfg.mlp_dim / ms / 1e9
    q = torch.randn(1, tokens, h, cfg.head_dim, device=dev, dtype=dtype)
    ms_a = timed(lambda: attention(q, q, q), max(2, reps // 2), 1, dev)
    att = 4 * tokens * tokens * d / ms_a / 1e9
    return {"matmul_tflops": round(mm, 4), "attention_tflops": round(att, 4), "attention_ms": round(ms_a, 2)}


def peak_gib(dev) -> float:
    return torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else float("nan")


def text_encoder_then_offload(sizes: dict, text_len: int, dev, dtype) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Cosmos-Reason1 (random) through the node: encode prompt and negative, then offload (to host memory)."""
    from nodes.cosmos.reason1 import CosmosReason1EncoderNode
    node = CosmosReason1EncoderNode("text", {**sizes, "text_len": text_len,
                                             "dtype": "bf16" if dtype == torch.bfloat16 else "fp32"}, str(dev))
    t0 = time.perf_counter()
    node.load()
    load_s = time.perf_counter() - t0
    ms = timed(lambda: (node._cache.clear(), node.encode("a robot arm picks up a red cube")), 2, 1, dev)
    cond, uncond = node.encode("a robot arm picks up a red cube"), node.encode("blurry, static")
    resident = (torch.cuda.memory_allocated(dev) / 2 ** 30) if dev.type == "cuda" else float("nan")
    t0 = time.perf_counter()
    node.offload()
    offload_s = time.perf_counter() - t0
    after = (torch.cuda.memory_allocated(dev) / 2 ** 30) if dev.type == "cuda" else float("nan")
    row = {"what": "reason1_7b", "encode_ms": round(ms, 1), "load_s": round(load_s, 1),
           "offload_s": round(offload_s, 1), "resident_gib_before_offload": round(resident, 2),
           "resident_gib_after_offload": round(after, 2), "features": list(cond.shape)}
    return row, cond, uncond


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip", default=os.environ.get("COSMOS_SKIP", ""), help="comma list: text,vae,ceil")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    sizes = DRY if args.dry else FULL
    dev = torch.device("cpu" if args.dry or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    torch.backends.cudnn.benchmark = True
    rows = []

    def log(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    T, H, W = sizes["latent"]
    cond_text = None
    if "text" not in skip:
        try:   # the DiT numbers do not depend on it: go on with random features if transformers differs there
            row, cond_text, uncond_text = text_encoder_then_offload(sizes["reason1"], sizes["text_len"], dev, dtype)
            log(row)
        except Exception as e:  # noqa: BLE001
            log({"what": "reason1_7b", "error": f"{type(e).__name__}: {e}"[:300]})
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if cond_text is None:
        width = sizes["cfg"]["crossattn_proj_in_channels"]
        cond_text = torch.randn(1, sizes["text_len"], width, device=dev, dtype=dtype)
        uncond_text = torch.randn(1, sizes["text_len"], width, device=dev, dtype=dtype)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    cfg = CosmosConfig(**sizes["cfg"])
    with torch.device("meta"):
        model = CosmosDiT(cfg)
    model = random_init(model, 0, device=dev, dtype=dtype).eval().requires_grad_(False)
    tokens = T * (H // cfg.patch_spatial) * (W // cfg.patch_spatial)
    flops = forward_flops(cfg, tokens, sizes["text_len"])
    tf = {k: v / 1e12 for k, v in flops.items()}
    total_tf = sum(tf.values())
    g = torch.Generator(device="cpu").manual_seed(0)
    gt = torch.randn(1, cfg.in_channels, T, H, W, generator=g).to(dev)
    x = torch.randn(1, cfg.in_channels, T, H, W, generator=g).to(dev)
    noise = torch.randn(1, cfg.in_channels, T, H, W, generator=g).to(dev)
    fv = FlowVideo2World(model, conditional_frame_timestep=0.1)
    with torch.no_grad():
        cond, uncond = model.prepare_cross(cond_text.to(dev)), model.prepare_cross(uncond_text.to(dev))
        # FLOP formula vs torch's counter on a small shape (2 latent frames)
        xs = x[:, :, :2, : min(H, 16), : min(W, 16)]
        small = forward_flops(cfg, 2 * (xs.shape[3] // 2) * (xs.shape[4] // 2), sizes["text_len"])
        counted = counted_flops(model, xs, torch.full((1, 2), 500.0, device=dev), cond)
        log({"what": "flop_check_small", "formula_gflop": round(sum(small.values()) / 1e9, 3),
             "flopcounter_gflop": round(counted / 1e9, 3)})

        t = torch.full((1,), 994.0, device=dev)
        seq = fv.velocity_fn(cond, uncond, 7.0, gt=gt, num_conditional_frames=1, batched=False)
        bat = fv.velocity_fn(cond, uncond, 7.0, gt=gt, num_conditional_frames=1, batched=True)
        one = fv.velocity_fn(cond, None, 0.0, gt=gt, num_conditional_frames=1)
        ms1 = timed(lambda: one(noise, x, t), args.reps, 1, dev)
        log({"what": "dit_forward_b1", "ms": round(ms1, 1), "tflop": round(total_tf, 2),
             "tflops_per_s": round(total_tf / ms1 * 1e3, 1), "tokens": tokens})
        ms_seq = timed(lambda: seq(noise, x, t), max(1, args.reps - 1), 1, dev)
        log({"what": "cfg_two_forwards", "ms": round(ms_seq, 1), "tflops_per_s": round(2 * total_tf / ms_seq * 1e3, 1)})
        ms_bat = timed(lambda: bat(noise, x, t), max(1, args.reps - 1), 1, dev)
        log({"what": "cfg_batched_b2", "ms": round(ms_bat, 1), "tflops_per_s": round(2 * total_tf / ms_bat * 1e3, 1)})
        timesteps, sigmas = flow_schedule("karras", 35)
        sched = FlowUniPC()
        v = torch.randn_like(x)

        def unipc_step():
            sched.set_schedule(timesteps, sigmas)
            y = sched.step(v, timesteps[0], x)
            sched.step(v, timesteps[1], y)          # the second step runs corrector + order-2 predictor
        ms_step = timed(unipc_step, 5, 2, dev) / 2
        best = min(ms_seq, ms_bat)
        per_step = best + ms_step
        log({"what": "sampling_step", "cfg_form": "batched" if ms_bat <= ms_seq else "two forwards",
             "ms": round(per_step, 1), "unipc_ms": round(ms_step, 2), "peak_gib": round(peak_gib(dev), 2)})
    if "ceil" not in skip:
        c = ceilings(cfg, tokens, dev, dtype, args.reps)
        c = {k: max(v, 1e-6) for k, v in c.items()}
        floor_ms = (tf["matmul"] / c["matmul_tflops"] + (tf["attention"] + tf["cross_attention"])
                    / c["attention_tflops"]) * 1e3
        log({"what": "ceilings", **c, "forward_floor_ms": round(floor_ms, 1),
             "fraction_of_ceiling_b1": round(floor_ms / ms1, 3),
             "fraction_of_ceiling_cfg": round(2 * floor_ms / best, 3),
             "flops_share_attention": round(tf["attention"] / total_tf, 3)})
    del model, cond, uncond
    gc.collect()
    vae_ms = 0.0
    if "vae" not in skip:
        from nodes.wan.vae import WanVAE
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        with torch.device("meta"):
            vae = WanVAE(dim=8 if args.dry else 96)
        vae = random_init(vae, 1, device=dev, dtype=dtype).eval().requires_grad_(False)
        vae.set_latent_stats(torch.zeros(16), torch.ones(16))
        if dev.type == "cuda":
            vae = vae.to_channels_last()
        lat = torch.randn(1, 16, T, H, W, generator=g).to(dev, dtype)
        if dev.type == "cuda":
            lat = lat.contiguous(memory_format=torch.channels_last_3d)
        with torch.no_grad():
            vae_ms = timed(lambda: vae.decode(lat, chunk=1), 1, 1, dev)
        log({"what": "wan_vae_decode", "latent": [T, H, W], "ms": round(vae_ms, 1),
             "peak_gib": round(peak_gib(dev), 2)})
    projected = (CALLS * per_step + vae_ms) / 1e3
    log({"what": "projected_35_steps", "model_calls": CALLS, "s": round(projected, 1),
         "s_sampling_only": round(CALLS * per_step / 1e3, 1),
         "lower_bound_s_at_ceilings": round(2 * CALLS * floor_ms / 1e3, 1) if "ceil" not in skip else None})
    with open(os.path.join(args.out, "cosmos_predict25.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    env = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "dtype": str(dtype)}
    print(json.dumps({"what": "env", **env}))
    print(f"\n{'what':24} {'ms':>10} {'TFLOP/s':>9}  note")
    for r in rows:
        if "ms" in r:
            print(f"{r['what']:24} {r['ms']:10.1f} {r.get('tflops_per_s', float('nan')):9.1f}  "
                  f"{r.get('cfg_form', '')}{' peak %.1f GiB' % r['peak_gib'] if 'peak_gib' in r else ''}")
    for r in rows:
        if r["what"] in ("ceilings", "projected_35_steps", "reason1_7b"):
            print(r)


if __name__ == "__main__":
    main()
