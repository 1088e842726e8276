"""Train the `world_cpu` world model from scratch: renderer -> autoencoder -> causal DiT, in one run.

    python examples/world_cpu/train.py --out runs/world --time-budget 420            # one GPU, ~7 min
    python examples/world_cpu/train.py --out /tmp/w --smoke                           # CPU, a minute

Phases, all inside ``--time-budget`` seconds of wall clock (data generation included; the run
stops cleanly and saves when the budget is spent):

1. autoencoder: a small conv encoder (here, training only) and the shipped ``FrameDecoder`` learn
   to squeeze a 64x64 frame into an 8x16x16 latent, on frames of random poses rendered on the fly;
   the latent statistics become the decoder's normalization buffers.
2. data: random keyboard walks from the start pose (``nodes.world.env.random_actions``), rendered
   and encoded into a pool of latent clips.
3. DiT: teacher-forced flow matching with causal blocks (``teacher_forcing.py``: every block sees
   the clean blocks of its KV window, exactly as the cached rollout will), trained mostly at the
   few timesteps the sampler visits (``--steps``, warped by ``--shift`` as ``ar.sampler`` does), so
   the same network is the few-step sampler; EMA weights are saved.
4. eval + save: ``world_cpu.safetensors`` (``dit.*`` + ``decoder.*``), ``config.json``,
   ``MODEL_CARD.md``, ``losses.jsonl`` under ``--out``; the rollouts' PSNR against the renderer.
   Copy the first three into ``nodes/world/weights/`` to ship them.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from teacher_forcing import teacher_forced_flow  # noqa: E402

from nodes.ar.rollout import ARRollout  # noqa: E402
from nodes.ar.schedule import ARSchedule  # noqa: E402
from nodes.common.causal import StreamSpec  # noqa: E402
from nodes.samplers.flow_match import FlowMatchTable  # noqa: E402
from nodes.wan.config import WanConfig  # noqa: E402
from nodes.world.causal import WorldDenoiser  # noqa: E402
from nodes.world.config import DecoderConfig, WorldConfig  # noqa: E402
from nodes.world.env import ACTIONS, Camera, World, parse_actions, random_actions  # noqa: E402
from nodes.world.model import ActionWanDiT, FrameDecoder, ResBlock  # noqa: E402

EVAL_SCRIPTS = ("W*16 A*8 W*8", "D*12 W*12 Q*4 E*4", "S*4 A*20 W*8", "W*8 D*8 W*8 A*8")


class FrameEncoder(nn.Module):
    """Pixels [N, 3, H, W] -> latent [N, C, H/4, W/4] (training only: the model generates latents itself)."""

    def __init__(self, latent_channels: int, channels=(16, 32, 64)):
        super().__init__()
        c0, c1, c2 = channels
        self.net = nn.Sequential(nn.Conv2d(3, c0, 3, padding=1), nn.SiLU(), nn.Conv2d(c0, c1, 3, stride=2, padding=1),
                                 ResBlock(c1), nn.SiLU(), nn.Conv2d(c1, c2, 3, stride=2, padding=1), ResBlock(c2),
                                 nn.SiLU(), nn.Conv2d(c2, latent_channels, 3, padding=1))

    def forward(self, x):
        return self.net(x)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder (weights, config.json, card, losses)")
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds of wall clock for everything")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a 60 s budget: checks the pipeline on a CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="frame size in pixels (multiple of 8)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--latent-channels", type=int, default=8)
    p.add_argument("--frames-per-block", type=int, default=4)
    p.add_argument("--window-frames", type=int, default=16)
    p.add_argument("--clip-blocks", type=int, default=10, help="blocks per training clip (from the start pose)")
    p.add_argument("--batch", type=int, default=32, help="clips per DiT step")
    p.add_argument("--pool-clips", type=int, default=8192, help="latent clips rendered for the DiT (at most)")
    p.add_argument("--steps", default="1000,666,333", help="the sampler's step list (ar.sampler steps)")
    p.add_argument("--shift", type=float, default=1.5)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--ae-fraction", type=float, default=0.12, help="share of the budget for the autoencoder")
    p.add_argument("--pool-fraction", type=float, default=0.12, help="most of the budget spent rendering the pool")
    p.add_argument("--ae-batch", type=int, default=256, help="frames per autoencoder step")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.smoke:
        a.time_budget = min(a.time_budget, 60.0)
        a.size, a.dim, a.layers, a.heads, a.ffn = 32, 32, 2, 2, 64
        a.clip_blocks, a.batch, a.pool_clips, a.ae_batch = 4, 2, 8, 8
    return a


def log_line(fh, **row):
    fh.write(json.dumps(row) + "\n")
    fh.flush()
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def random_poses(n: int, world: World, gen: torch.Generator, device) -> torch.Tensor:
    u = torch.rand(n, 3, generator=gen).to(device)
    return u * torch.tensor([world.layout.period, world.layout.period, 2 * math.pi], device=device)


def train_autoencoder(args, world, cfg, dev, deadline, fh, gen):
    enc, dec = FrameEncoder(cfg.decoder.latent_channels).to(dev), FrameDecoder(cfg.decoder).to(dev)
    opt = torch.optim.AdamW(list(enc.parameters()) + list(dec.parameters()), lr=2e-3, weight_decay=0.0)
    n = args.ae_batch
    step, t0 = 0, time.monotonic()
    while time.monotonic() < deadline or step < 2:
        with torch.no_grad():
            x = world.render(random_poses(n, world, gen, dev), chunk=n)
        z = enc(x)
        zn = z + 0.1 * z.detach().std() * torch.randn_like(z)        # a decoder that tolerates latent error
        loss = F.mse_loss(dec(zn), x) + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0 or step == 1:
            log_line(fh, phase="autoencoder", step=step, loss=float(loss.detach()), elapsed=time.monotonic() - t0)
    with torch.no_grad():
        z = torch.cat([enc(world.render(random_poses(n, world, gen, dev), chunk=n)) for _ in range(4)])
        mean, std = z.mean((0, 2, 3)), z.std((0, 2, 3)).clamp(min=1e-3)
        dec.latent_mean.copy_(mean)
        dec.latent_std.copy_(std)
        x = world.render(random_poses(n, world, gen, dev), chunk=n)
        rec = dec((enc(x) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).clamp(-1, 1)
        psnr = psnr_db(rec, x)
    log_line(fh, phase="autoencoder_done", steps=step, recon_psnr_db=psnr, elapsed=time.monotonic() - t0)
    encode = lambda x: (enc(x) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)  # noqa: E731
    return encode, dec.eval().requires_grad_(False), {"steps": step, "recon_psnr_db": psnr,
                                                      "seconds": time.monotonic() - t0}


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of frames in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a.float(), b.float()).clamp(min=1e-10)
    return float(10 * torch.log10(4.0 / mse))


def render_pool(args, world, encode, dev, deadline, fh, gen):
    frames = args.clip_blocks * args.frames_per_block
    chunk = 2 if args.smoke else max(1, 2048 // frames)
    acts, lats, t0 = [], [], time.monotonic()
    with torch.no_grad():
        while sum(len(a) for a in acts) < args.pool_clips and (time.monotonic() < deadline or not acts):
            n = min(chunk, args.pool_clips - sum(len(a) for a in acts))
            a = random_actions(n, frames, gen, device=dev)
            x = world.render(world.poses(a), chunk=n * frames)
            z = encode(x.flatten(0, 1)).unflatten(0, (n, frames))
            acts.append(a)
            lats.append(z.to(torch.bfloat16 if dev.type == "cuda" else torch.float32))
    acts, lats = torch.cat(acts), torch.cat(lats)
    log_line(fh, phase="pool", clips=len(acts), frames=frames, elapsed=time.monotonic() - t0)
    return acts, lats, {"clips": len(acts), "frames_per_clip": frames, "seconds": time.monotonic() - t0}


def init_for_training(model: ActionWanDiT) -> None:
    """Zero the output head and the action injector's scale/shift: the net starts as 'predict 0, ignore
    actions', a calm start for a model trained from scratch in minutes."""
    with torch.no_grad():
        model.head.head.weight.zero_()
        model.head.head.bias.zero_()
        for blk in model.blocks:
            for lin in (blk.cam_scale_layer, blk.cam_shift_layer):
                lin.weight.zero_()
                lin.bias.zero_()
        model.world_context.normal_(0, 1.0)


def train_dit(args, cfg, pool, dev, deadline, fh, gen):
    acts, lats = pool
    model = ActionWanDiT(cfg.dit, cfg.num_actions).to(dev)
    init_for_training(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    sched = ARSchedule.build(FlowMatchTable(cfg.shift), list(cfg.steps))
    t_steps = torch.tensor(sched.rest.t, device=dev)
    fpb, nb = cfg.frames_per_block, args.clip_blocks
    use_amp = dev.type == "cuda"
    step, t0, losses = 0, time.monotonic(), []
    total = max(1.0, deadline - t0)
    while time.monotonic() < deadline or step < 2:
        frac = min(1.0, (time.monotonic() - t0) / total)
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(acts), (args.batch,), generator=gen).to(dev)
        z, a = lats[idx].float(), acts[idx]
        B = z.shape[0]
        # per-block timestep: mostly the sampler's own steps, sometimes anywhere
        pick = t_steps[torch.randint(0, len(t_steps), (B, nb), device=dev)]
        anywhere = torch.rand(B, nb, device=dev) * 1000
        t_blk = torch.where(torch.rand(B, nb, device=dev) < 0.8, pick, anywhere)
        t_n = t_blk.repeat_interleave(fpb, 1)
        sigma = (t_n / 1000).view(B, -1, 1, 1, 1)
        eps = torch.randn_like(z)
        noisy = (1 - sigma) * z + sigma * eps
        # context frames: clean (as inference commits them) or lightly noised (robust to its own errors)
        sc = torch.where(torch.rand(B, 1, device=dev) < 0.5, torch.rand(B, 1, device=dev) * 0.1,
                         torch.zeros(B, 1, device=dev)).expand(B, z.shape[1])
        clean = (1 - sc.view(B, -1, 1, 1, 1)) * z + sc.view(B, -1, 1, 1, 1) * torch.randn_like(z)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                flow = teacher_forced_flow(model, clean, noisy, sc * 1000, t_n, a, fpb, cfg.window_frames)
            loss = F.mse_loss(flow.float(), eps - z)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        except (RuntimeError, torch.OutOfMemoryError) as e:   # one unattended GPU run: degrade, don't die
            if step > 0 or (not use_amp and args.batch <= 4):
                raise
            opt.zero_grad(set_to_none=True)
            if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e):
                args.batch = max(4, args.batch // 2)
            else:
                use_amp = False
            log_line(fh, phase="dit_retry", error=str(e).splitlines()[0][:200], batch=args.batch, amp=use_amp)
            torch.cuda.empty_cache() if dev.type == "cuda" else None
            continue
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        step += 1
        losses.append(float(loss.detach()))
        if step % 25 == 0 or step == 1:
            mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
            log_line(fh, phase="dit", step=step, loss=sum(losses[-25:]) / len(losses[-25:]), lr=lr, grad_norm=gnorm,
                     elapsed=time.monotonic() - t0, batch=args.batch, peak_gib=mem)
    final = sum(losses[-100:]) / len(losses[-100:])
    log_line(fh, phase="dit_done", steps=step, final_loss=final, elapsed=time.monotonic() - t0)
    return ema.eval(), {"steps": step, "final_loss_last100": final, "first_loss": losses[0],
                        "seconds": time.monotonic() - t0}


@torch.no_grad()
def rollout(dit: ActionWanDiT, decoder: FrameDecoder, cfg: WorldConfig, actions: torch.Tensor,
            seed: int = 0) -> torch.Tensor:
    """The engine's path in plain Python: WorldDenoiser stream + ARRollout (as ar.sampler), then the decoder.
    actions [1, T] -> frames [1, T, 3, S, S]."""
    dev = dit.patch_embedding.weight.device
    fpb, T = cfg.frames_per_block, actions.shape[1]
    den = WorldDenoiser(dit, dit.cfg, dit.dtype, "auto")
    n = cfg.latent_size
    stream = den.open_stream(StreamSpec((cfg.decoder.latent_channels, n, n), fpb, window_frames=cfg.window_frames))
    stream.set_conditions(text=dit.context(1))
    gen = torch.Generator(device=dev).manual_seed(seed)
    sched = ARSchedule.build(FlowMatchTable(cfg.shift), list(cfg.steps))
    roll = ARRollout(stream, sched, fpb, generator=gen)
    out = []
    for b in range(T // fpb):
        noise = torch.randn(1, fpb, cfg.decoder.latent_channels, n, n, generator=gen, device=dev)
        out.append(roll.step(noise, action=actions[:, b * fpb:(b + 1) * fpb].to(dev)))
    return decoder.decode_video(torch.cat(out, 1))


def evaluate(dit, decoder, cfg, world, dev, fh) -> dict:
    res = {}
    for script in EVAL_SCRIPTS:
        a, gt = world.rollout(script, device=dev)
        a, gt = a[:, : (a.shape[1] // cfg.frames_per_block) * cfg.frames_per_block], gt
        pred = rollout(dit, decoder, cfg, a)
        res[script] = psnr_db(pred, gt[:, : pred.shape[1]])
    res_mean = sum(res.values()) / len(res)
    log_line(fh, phase="eval", mean_psnr_db=res_mean, **{f"psnr[{k}]": v for k, v in res.items()})
    return {"rollout_psnr_db": res, "mean_rollout_psnr_db": res_mean}


def save(args, cfg: WorldConfig, dit, decoder, record: dict) -> None:
    from safetensors.torch import save_file
    tensors = {f"dit.{k}": v.detach().float().cpu().contiguous() for k, v in dit.state_dict().items()}
    tensors.update({f"decoder.{k}": v.detach().float().cpu().contiguous() for k, v in decoder.state_dict().items()})
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "world_cpu.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "model": "fd world_cpu"})
    tmp.replace(args.out / "world_cpu.safetensors")
    cfg = WorldConfig(**{**cfg.__dict__, "training": record})
    (args.out / "config.json").write_text(json.dumps(cfg.to_json(), indent=1) + "\n")
    (args.out / "MODEL_CARD.md").write_text(model_card(cfg, record, sum(v.numel() for k, v in tensors.items()
                                                                          if k.startswith("dit."))))


def model_card(cfg: WorldConfig, r: dict, dit_params: int) -> str:
    ev = r.get("eval", {})
    rows = "\n".join(f"| `{k}` | {v:.2f} |" for k, v in ev.get("rollout_psnr_db", {}).items())
    d = cfg.dit
    return f"""# world_cpu: a small world model trained by fd

What it is: an action-conditioned causal Wan DiT ({dit_params / 1e6:.2f} M parameters: dim {d.dim}, {d.num_layers}
layers, {d.num_heads} heads, patch {list(d.patch_size)}, actions through LingBot-World's camera path) and a tiny
frame decoder ({cfg.decoder.latent_channels}x{cfg.latent_size}x{cfg.latent_size} latent -> {cfg.frame_size}x{cfg.frame_size} pixels).
Blocks of {cfg.frames_per_block} frames, KV window {cfg.window_frames} frames, sampler steps {list(cfg.steps)} at shift {cfg.shift}.

What it was trained on: the procedural world of `nodes/world/env.py` only (a periodic textured plane with
coloured spheres, fog and sky), rendered from random keyboard walks (`random_actions`) that start at the
origin; {r.get('pool', {}).get('clips', '?')} clips of {r.get('pool', {}).get('frames_per_clip', '?')} frames. Actions: {' '.join(cfg.actions)}
(W/S forward/back, A/D turn, Q/E strafe, '.' stand still). It knows nothing else.

How: `{r.get('command', '')}` on {r.get('device', '?')}; {r.get('total_seconds', 0):.0f} s wall in all
(autoencoder {r.get('autoencoder', {}).get('seconds', 0):.0f} s / {r.get('autoencoder', {}).get('steps', 0)} steps, data
{r.get('pool', {}).get('seconds', 0):.0f} s, DiT {r.get('dit', {}).get('seconds', 0):.0f} s / {r.get('dit', {}).get('steps', 0)} steps
of teacher-forced flow matching with causal blocks, eval + save the rest).

Losses: autoencoder reconstruction PSNR {r.get('autoencoder', {}).get('recon_psnr_db', float('nan')):.2f} dB; DiT flow
MSE {r.get('dit', {}).get('first_loss', float('nan')):.4f} at the first step, {r.get('dit', {}).get('final_loss_last100', float('nan')):.4f}
(mean of the last 100 steps). Every logged value: `losses.jsonl`.

Rollouts of 32 frames vs the renderer's ground truth (PSNR, dB; EMA weights, seed 0):

| actions | PSNR |
|---|---|
{rows}

Mean: {ev.get('mean_rollout_psnr_db', float('nan')):.2f} dB.

Retrain: `python examples/world_cpu/train.py --out DIR --time-budget 420` (one GPU), then copy
`DIR/world_cpu.safetensors` and `DIR/config.json` (and this card) into `nodes/world/weights/`.
"""


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    gen = torch.Generator().manual_seed(args.seed)
    if args.size % 8:
        raise SystemExit(f"--size {args.size}: must be a multiple of 8")
    world = World(camera=Camera(size=args.size))
    cfg = WorldConfig(
        dit=WanConfig(patch_size=(1, 2, 2), text_len=1, in_dim=args.latent_channels, dim=args.dim, ffn_dim=args.ffn,
                      freq_dim=256, text_dim=16, out_dim=args.latent_channels, num_heads=args.heads,
                      num_layers=args.layers),
        decoder=DecoderConfig(args.latent_channels, (64, 32, 16) if not args.smoke else (16, 8, 8)),
        actions=ACTIONS, frame_size=args.size, frames_per_block=args.frames_per_block,
        window_frames=args.window_frames, steps=tuple(int(s) for s in args.steps.split(",")), shift=args.shift)
    args.out.mkdir(parents=True, exist_ok=True)
    budget = args.time_budget
    reserve = 10.0 if args.smoke else max(20.0, 0.06 * budget)     # eval + save
    record = {"command": "python examples/world_cpu/train.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} "
              "threads)", "time_budget_s": budget, "seed": args.seed}
    with open(args.out / "losses.jsonl", "w") as fh:
        encode, decoder, record["autoencoder"] = train_autoencoder(
            args, world, cfg, dev, t_start + args.ae_fraction * budget, fh, gen)
        pool_acts, pool_lats, record["pool"] = render_pool(
            args, world, encode, dev, time.monotonic() + args.pool_fraction * budget, fh, gen)
        dit, record["dit"] = train_dit(args, cfg, (pool_acts, pool_lats), dev, t_start + budget - reserve, fh, gen)
        record["eval"] = evaluate(dit, decoder, cfg, world, dev, fh)
        record["total_seconds"] = time.monotonic() - t_start
        save(args, cfg, dit, decoder, record)
        log_line(fh, phase="saved", out=str(args.out), total_seconds=time.monotonic() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
