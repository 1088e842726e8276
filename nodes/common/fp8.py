"""FP8 (e4m3) building blocks: amax scaling, quantise/dequantise, and the FP8 linear layer.

Every scale here is computed on the device from the tensor it scales (amax / 448), so nothing
reads back to the host and a captured CUDA graph recomputes the scales on every replay
(no calibration, no delayed scaling). The granularity is the caller's: a whole tensor, one
scale per row (a token's hidden vector, a weight's output channel) or per (token, head).

Rounding: e4m3 keeps 3 mantissa bits, so a value in the normal range (|x / s| >= 2^-6) comes
back within 2^-4 of itself, relative; below that (subnormals, spacing 2^-9) within 2^-10 s,
absolute. ``roundtrip_bound`` states exactly that and the tests hold the code to it.

``Fp8Linear`` replaces an ``nn.Linear``: its weight is quantised once, per output channel, when
the layer is made; each call quantises its input per token and runs ``torch._scaled_mm`` with
row-wise scales (bias fused where the build supports it), out in the layer's dtype. The same
op exists on CPU in torch >= 2.5, so the layer runs (slowly) there too; the node still refuses
FP8 on CPU, which only the tests use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)      # 448
E4M3_MANTISSA_BITS = 3
E4M3_MIN_NORMAL = 2.0 ** -6
E4M3_SUBNORMAL_STEP = 2.0 ** -9
TINY = 1e-12                                  # amax floor: an all-zero row gets a finite scale
FP8_MIN_CAPABILITY = (8, 9)                   # Ada / Hopper and later have FP8 tensor cores


def fp8_unsupported_reason(device) -> str | None:
    """Why FP8 kernels cannot run on ``device`` (None when they can, or when this machine cannot tell:
    a CUDA device named in a spec checked on a machine without CUDA is judged where it runs)."""
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type != "cuda":
        return f"FP8 kernels need a CUDA GPU with FP8 tensor cores (sm_89+); this node runs on {dev.type}"
    if not torch.cuda.is_available():
        return None
    cap = torch.cuda.get_device_capability(dev)
    if cap < FP8_MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(dev)} (sm_{cap[0]}{cap[1]}) has no FP8 tensor cores; "
                "FP8 needs sm_89 (Ada) or sm_90 (Hopper) and later")
    return None


def amax_scale(x: torch.Tensor, dims=None) -> torch.Tensor:
    """float32 scale s = amax / 448 over ``dims`` (all when None), kept for broadcasting."""
    a = x.abs().amax() if dims is None else x.abs().amax(dim=dims, keepdim=True)
    return a.float().clamp_min(TINY) / E4M3_MAX


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to e4m3 (clamped to +-448, so a scale from another tensor cannot overflow to NaN)."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def dequantize(x8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (x8.float() * scale).to(dtype)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per row of the last dim: (x8 [..., K], scale [..., 1] float32)."""
    s = amax_scale(x, -1)
    return quantize(x, s), s


def roundtrip_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |x - dequantize(quantize(x, s), s)| for round-to-nearest e4m3: half an ulp,
    i.e. 2^-(m+1) |x| in the normal range and half the subnormal step (times s) below it."""
    rel = 2.0 ** -(E4M3_MANTISSA_BITS + 1)
    return torch.maximum(rel * x.float().abs(), (E4M3_SUBNORMAL_STEP / 2) * scale.float())


@dataclass
class QuantizedRows:
    """An activation already quantised per row (e.g. the one input of q, k and v), [M, K] + [M, 1]."""
    data: torch.Tensor
    scale: torch.Tensor
    lead: tuple[int, ...]          # the leading shape to restore on the output

    @classmethod
    def cat(cls, parts: list["QuantizedRows"]) -> "QuantizedRows":
        """Rows of several [b_i, L] inputs stacked along the batch (every part's other lead dims equal)."""
        lead = (sum(p.lead[0] for p in parts),) + tuple(parts[0].lead[1:])
        return cls(torch.cat([p.data for p in parts]), torch.cat([p.scale for p in parts]), lead)

    @classmethod
    def of(cls, x: torch.Tensor, quant=quantize_rows) -> "QuantizedRows":
        x8, s = quant(x.reshape(-1, x.shape[-1]))
        return cls(x8.contiguous(), s, tuple(x.shape[:-1]))     # _scaled_mm wants a row-major [M, K]


class Fp8Linear(nn.Module):
    """y = x W^T + b with W in e4m3 (one scale per output channel, quantised once) and x quantised per
    row on every call; the product accumulates in float32 inside ``torch._scaled_mm``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype):
        super().__init__()
        n, k = weight.shape
        if n % 16 or k % 16:
            raise ValueError(f"FP8 matmuls need both weight dims divisible by 16, got {n}x{k}")
        w8, ws = quantize_rows(weight.detach())
        self.register_buffer("weight_fp8", w8.contiguous())
        self.register_buffer("weight_scale", ws.reshape(1, n).contiguous())   # [1, N] for the row-wise mm
        self.register_buffer("bias", None if bias is None else bias.detach().to(out_dtype))
        self.out_dtype, self.in_features, self.out_features = out_dtype, k, n
        self.quant = quantize_rows          # compile_elementwise may swap in a compiled one
        self._bias_in_mm: bool | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Fp8Linear":
        return cls(lin.weight, lin.bias, lin.weight.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.weight_fp8, self.weight_scale.reshape(-1, 1))

    def forward(self, x) -> torch.Tensor:
        q = x if isinstance(x, QuantizedRows) else QuantizedRows.of(x, self.quant)
        y = self._mm(q.data, q.scale)
        return y.reshape(*q.lead, self.out_features)

    def _mm(self, x8, sx):
        w = self.weight_fp8.t()
        if self.bias is not None and self._bias_in_mm is not False:
            try:   # decided on the first (eager) call, before any capture
                y = torch._scaled_mm(x8, w, sx, self.weight_scale, bias=self.bias, out_dtype=self.out_dtype)
                self._bias_in_mm = True
                return y
            except (RuntimeError, ValueError, TypeError, NotImplementedError):
                self._bias_in_mm = False
        y = torch._scaled_mm(x8, w, sx, self.weight_scale, out_dtype=self.out_dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 row-wise"


def fp8_linears(module: nn.Module, names: tuple[str, ...]) -> int:
    """Replace the ``nn.Linear`` children at the dotted ``names`` of ``module`` by Fp8Linear (in place);
    returns how many were replaced."""
    done = 0
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        lin = getattr(owner, leaf)
        if isinstance(lin, nn.Linear):
            setattr(owner, leaf, Fp8Linear.from_linear(lin))
            done += 1
    return done
