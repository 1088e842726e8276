"""Placement: which device each node runs on, and why.

``device: auto`` puts a node on the CUDA device with the most free memory left
after the nodes already placed there (by their parameter-memory estimates), or on
the CPU when no CUDA device can hold it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    device: str
    reason: str
    estimate_bytes: int = 0


def _this_process_cuda() -> int | None:
    """Under torch.distributed each rank owns one GPU (LOCAL_RANK): ``cuda`` and ``auto`` mean that one."""
    try:
        import torch
        import torch.distributed as dist
        if torch.cuda.is_available() and dist.is_available() and dist.is_initialized():
            return torch.cuda.current_device()
    except Exception:
        pass
    return None


def _free_cuda_bytes(cuda_devices: int | None) -> list[int]:
    try:
        import torch
        if not torch.cuda.is_available():
            return []
        n = torch.cuda.device_count() if cuda_devices is None else cuda_devices
        return [torch.cuda.mem_get_info(i)[0] for i in range(n)]
    except Exception:
        return []


def place(requests: dict, cuda_devices: int | None = None, free_bytes: list[int] | None = None,
          headroom: float = 0.8) -> dict[str, Placement]:
    """``requests``: name -> (requested device, node). Returns name -> Placement."""
    free = list(_free_cuda_bytes(cuda_devices) if free_bytes is None else free_bytes)
    rank_gpu = _this_process_cuda() if free_bytes is None else None
    out: dict[str, Placement] = {}
    for name, (requested, node) in requests.items():
        est = int(node.estimate_bytes() or 0)
        if rank_gpu is not None and requested in ("auto", "cuda"):
            out[name] = Placement(f"cuda:{rank_gpu}", "this rank's GPU (torch.distributed)", est)
            continue
        if requested != "auto":
            dev = "cuda:0" if requested == "cuda" else requested
            if dev.startswith("cuda:") and int(dev.split(":")[1]) < len(free):
                free[int(dev.split(":")[1])] -= est
            out[name] = Placement(dev, "set in the spec", est)
            continue
        if free:
            best = max(range(len(free)), key=lambda i: free[i])
            if est <= free[best] * headroom:
                free[best] -= est
                out[name] = Placement(f"cuda:{best}", f"auto: {est / 2**30:.2f} GiB fits the GPU with the most "
                                      f"free memory", est)
                continue
            out[name] = Placement("cpu", f"auto: {est / 2**30:.2f} GiB does not fit any GPU", est)
            continue
        out[name] = Placement("cpu", "auto: no CUDA device", est)
    return out
