"""Plant known bugs, one at a time, in a copy of the repository and report which ones the tests miss.

Run by hand before a release (CPU, about a minute with the targeted tests):

    python benchmarks/mutations.py                 # every mutation, each against its own tests
    python benchmarks/mutations.py --suite         # each against the whole suite (slow)
    python benchmarks/mutations.py --only rope_sink_shift_sign

Each mutation replaces one exact snippet (which must occur once: a refactor that moves it makes the
script fail loudly rather than test nothing) and runs pytest in the copy. "caught" means pytest
failed; the failing tests are printed as evidence. A mutation that survives is a number no
test pins. The working tree is never touched: the copy is made from ``git ls-files``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WINDOW = ("tests/test_relative_rope.py", "tests/test_ar_sampler_wan.py")
SAMPLER = ("tests/test_ar_sampler_wan.py", "tests/test_ar_sampler_goldens.py", "tests/test_model_seam.py")
T2V = ("tests/test_schedulers.py",)
PARITY = ("tests/test_causal_dit.py", "tests/test_ar_rollout.py")


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str


MUTATIONS = (
    # features of our own (no golden reaches them)
    Mutation("rope_sink_shift_sign", "nodes/common/rope.py", "ang = torch.cat([frames * _inv_freq",
             "ang = torch.cat([-frames * _inv_freq", WINDOW, "relative RoPE moves the sink keys backwards"),
    Mutation("sink_shift_off_by_one", "nodes/common/kv_cache.py", "max(0, end - self.ring_frames - s))",
             "max(0, end - self.ring_frames - s + 1))", WINDOW, "relative RoPE shifts the sink one frame too far"),
    Mutation("sink_shift_on_height", "nodes/common/rope.py",
             "ang = torch.cat([frames * _inv_freq(pt, device=device),\n"
             "                     torch.zeros(ph + pw, dtype=torch.float64, device=device)])",
             "ang = torch.cat([torch.zeros(pt, dtype=torch.float64, device=device),\n"
             "                     frames * _inv_freq(ph, device=device), torch.zeros(pw, dtype=torch.float64, "
             "device=device)])", WINDOW, "the sink shift turns the height axis instead of time"),
    Mutation("sampler_shift_hardwired", "nodes/ar/node.py", "FlowMatchTable(self.p.shift)", "FlowMatchTable(5.0)",
             SAMPLER, "ar.sampler ignores its shift param"),
    Mutation("sampler_first_chunk_dropped", "nodes/ar/node.py", "first_chunk_steps=self.p.first_chunk_steps,",
             "first_chunk_steps=None,", SAMPLER, "ar.sampler ignores first_chunk_steps"),
    Mutation("sampler_warp_forced", "nodes/ar/node.py", "warp=self.p.warp,", "warp=True,", SAMPLER,
             "ar.sampler ignores warp: false"),
    Mutation("sampler_context_noise_dropped", "nodes/ar/node.py", "context_noise=self.p.context_noise)",
             "context_noise=0.0)", SAMPLER, "ar.sampler's context pass ignores context_noise"),
    Mutation("sampler_sink_dropped", "nodes/ar/node.py", "sink_frames=self.p.sink_frames, window_frames",
             "sink_frames=0, window_frames", SAMPLER, "ar.sampler opens the stream without its sink"),
    Mutation("sampler_rope_mode_dropped", "nodes/ar/node.py", "rope_mode=self.p.rope_mode,",
             "rope_mode='absolute',", SAMPLER, "ar.sampler always asks for absolute RoPE"),
    Mutation("sampler_seed_input_ignored", "nodes/ar/node.py", 'seed = int(inputs.get("seed", self.p.seed))',
             "seed = int(self.p.seed)", SAMPLER, "ar.sampler ignores its seed input"),
    Mutation("sampler_window_noise_all_first", "nodes/ar/node.py", "if self.p.window_frames is None:\n"
             "            state.noise", "if True:\n            state.noise", SAMPLER,
             "with a window, noise is drawn for all blocks up front (another draw order)"),
    Mutation("context_renoise_sigma", "nodes/ar/schedule.py",
             "table.scalar_sigmas(float(context_noise))[0])", "table.scalar_sigmas(float(context_noise))[1] * 0.5)",
             SAMPLER, "the context pass re-noises with a wrong sigma"),
    Mutation("t2v_shift_hardwired", "nodes/wan/node_t2v.py", "shift=self.p.shift)", "shift=5.0)", T2V,
             "wan.t2v_sampler ignores its shift param"),
    Mutation("t2v_guide_scale_hardwired", "nodes/wan/node_t2v.py", "uncond, self.p.guide_scale)", "uncond, 5.0)",
             T2V, "wan.t2v_sampler ignores guide_scale"),
    Mutation("t2v_solver_forced", "nodes/wan/node_t2v.py", 'FlowUniPC() if self.p.solver == "unipc"',
             "FlowUniPC() if True", T2V, "wan.t2v_sampler ignores solver: euler"),
    # upstream-matched math (the goldens' job), as a control
    Mutation("renoise_sigma_index", "nodes/ar/rollout.py", "plan.sigma_noise[i + 1]", "plan.sigma_noise[i]",
             PARITY, "re-noise to the current step's sigma instead of the next"),
    Mutation("rope_axes_swapped", "nodes/common/rope.py", "return c - 2 * (c // 3), c // 3, c // 3",
             "return c // 3, c - 2 * (c // 3), c // 3", PARITY, "RoPE gives time the height axis' pairs"),
    Mutation("ring_evicts_sink", "nodes/common/kv_cache.py",
             "return frame if frame < s else s + (frame - s) % self.ring_frames",
             "return frame % self.window_frames", PARITY, "the ring overwrites the sink"),
)


def copy_repo(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def failures(out: str, shown: int = 3) -> str:
    """The failing tests pytest lists (the first few, and how many), else its last line."""
    failed = [line.split(" - ")[0].split(" ", 1)[1] for line in out.splitlines()
              if line.startswith(("FAILED ", "ERROR "))]
    if not failed:
        return out.strip().splitlines()[-1] if out.strip() else ""
    more = f" (+{len(failed) - shown} more)" if len(failed) > shown else ""
    return ", ".join(failed[:shown]) + more


def run(copy: Path, tests: list[str], timeout: int) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(copy)}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=copy,
                       env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="mutation names")
    ap.add_argument("--suite", action="store_true", help="run the whole suite for every mutation")
    ap.add_argument("--timeout", type=int, default=1800)
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    with tempfile.TemporaryDirectory(prefix="fd-mutations-") as tmp:
        copy = Path(tmp)
        copy_repo(copy)
        rc, out = run(copy, ["tests"] if args.suite else sorted({t for m in chosen for t in m.tests}), args.timeout)
        if rc != 0:
            print("the unmutated tests fail; fix that first:\n" + failures(out))
            return 2
        survivors = []
        for m in chosen:
            path = copy / m.file
            text = path.read_text()
            if text.count(m.old) != 1:
                print(f"{m.name}: the snippet occurs {text.count(m.old)} times in {m.file}; update the mutation")
                return 2
            path.write_text(text.replace(m.old, m.new))
            t0 = time.time()
            try:
                rc, out = run(copy, ["tests"] if args.suite else list(m.tests), args.timeout)
            finally:
                path.write_text(text)
            verdict = "caught" if rc == 1 else ("ERROR" if rc not in (0, 1) else "SURVIVED")
            if rc == 0:
                survivors.append(m.name)
            print(f"{verdict:8s} {m.name:32s} {time.time() - t0:5.1f}s  {m.what}")
            if rc != 0:
                print(f"         {failures(out)}")
        print(f"{len(chosen) - len(survivors)}/{len(chosen)} caught" +
              (f"; survived: {', '.join(survivors)}" if survivors else ""))
        return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
