"""Shared pieces of the GPU benchmarks: full-size random-weight models, event timing, FLOP counts.

Random weights (no checkpoint can be downloaded here) are drawn on the GPU with a
1/sqrt(fan_in) scale, so activations stay finite through 30 layers; timing does not
depend on the values, and the graph-vs-eager checks compare the same weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from statistics import median

import torch
from torch import nn

from nodes.wan.config import WAN_1_3B, WanConfig
from nodes.wan.dit import WanDiT

H, W = 480, 832          # W1 frame size
LATENT_HW = (H // 8, W // 8)
TEXT_LEN = 512


def log(rec: dict, path: str | None = None) -> None:
    line = json.dumps(rec, default=str)
    print(line, flush=True)
    out = os.environ.get("OUT")
    if out and path:
        with open(os.path.join(out, path), "a") as f:
            f.write(line + "\n")


def env() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "cudnn": torch.backends.cudnn.version(),
            "commit": commit or os.environ.get("FD_COMMIT")}


@torch.no_grad()
def random_init_(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator(device="cuda").manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            fan_in = p[0].numel()
            p.normal_(0, fan_in ** -0.5, generator=g)
        elif "norm" in name or "gamma" in name or name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.normal_(0, 0.02, generator=g)
    return module


def build_dit(cfg: WanConfig = WAN_1_3B, dtype=torch.bfloat16, seed: int = 0) -> WanDiT:
    with torch.device("meta"):
        m = WanDiT(cfg)
    m = m.to_empty(device="cuda")
    random_init_(m, seed)
    with torch.no_grad():  # upstream's init: modulation ~ randn / sqrt(dim)
        for blk in m.blocks:
            blk.modulation.normal_(0, cfg.dim ** -0.5)
        m.head.modulation.normal_(0, cfg.dim ** -0.5)
    return m.to(dtype).eval().requires_grad_(False)


def median_ms(fn, reps: int, warmup: int, cuda: bool) -> float:
    """Median ms of fn(): CUDA events on a GPU, the wall clock on a CPU (dry runs)."""
    if cuda:
        return events_ms(fn, reps, warmup)[0]
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return median(times)


def events_ms(fn, reps: int = 5, warmup: int = 2) -> tuple[float, list[float]]:
    """Median ms of fn() over reps (CUDA events), after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return median(times), times


def dit_forward_tflop(cfg: WanConfig, q_tokens: int, kv_tokens: int, batch: int = 1) -> float:
    """Matmul + attention FLOPs of one DiT forward (cross K/V precomputed per prompt)."""
    d, L = cfg.dim, q_tokens
    lin = 2 * L * (4 * d * d + 2 * d * d + 2 * d * cfg.ffn_dim)
    attn = 4 * L * kv_tokens * d + 4 * L * cfg.text_len * d
    return batch * cfg.num_layers * (lin + attn) / 1e12


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Stopwatch:
    def __init__(self):
        self.t = time.perf_counter()

    def s(self) -> float:
        return time.perf_counter() - self.t
