"""`fd exec --nproc N` with a context-parallel DiT equals the single-process run (CPU, gloo)."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def fd(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "flashdreams_cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def dump_spec(tmp_path, path):
    f = tmp_path / "dump.yaml"
    f.write_text("sinks:\n  latents:\n    type: sink.safetensors\n    in: {tensor: sampler.latent}\n"
                 f"    params: {{path: {path}}}\n")
    return f


@pytest.mark.parametrize("nproc, strategy", [(2, "ring"), (3, "ring"), (2, "ulysses")])
def test_context_parallel_exec_equals_single_process(tmp_path, nproc, strategy):
    common = ["--quiet", "inputs.num_blocks=3", f"sinks.video.params.path={tmp_path / 'v.mp4'}"]
    ref, par = tmp_path / "ref.safetensors", tmp_path / "par.safetensors"
    r = fd("exec", "tiny_self_forcing", "--set", dump_spec(tmp_path, ref), *common)
    assert r.returncode == 0, r.stderr
    (tmp_path / "dump.yaml").unlink()
    r = fd("exec", "tiny_self_forcing", "--nproc", nproc, "--set", dump_spec(tmp_path, par), *common,
           f"nodes.dit.parallel.context={nproc}", f"nodes.dit.parallel.strategy={strategy}")
    assert r.returncode == 0, r.stderr
    a, b = load_file(str(ref)), load_file(str(par))
    assert set(a) == set(b) == {"block.0", "block.1", "block.2"}
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5)


def test_group_size_must_divide_world_size():
    r = fd("validate", "tiny_self_forcing", "nodes.dit.parallel.context=2")
    assert r.returncode == 2 and "does not divide the world size 1" in r.stderr
    assert fd("validate", "tiny_self_forcing", "nodes.dit.parallel.context=2", "--world-size", 4).returncode == 0
