"""Which attention backend ``attention: auto`` picks on each GPU architecture: measured, never guessed.

Each row records where the ranking came from (date, device, the command that measured it): TFLOP/s at
the Wan shapes (Self-Forcing W1's 4,680-token query block against 4.7k–33k cached keys, 12 heads x 128;
and the 14B shape, 40 heads). ``auto`` takes the first backend of the row that is installed and usable,
"auto" being torch's own SDPA order (cuDNN first, the measured best of torch's backends), so a CPU, an unmeasured GPU, or a missing optional
package all fall back to it.
"""
from __future__ import annotations

from typing import Callable

# (major, minor) compute capability -> measured ranking, fastest first
MEASURED: dict[tuple[int, int], dict] = {
    (9, 0): {
        "ranking": ("flash4", "auto"),
        "head_dims": {"flash4": (128,)},        # measured there only: other head dims keep torch's order
        "device": "NVIDIA H100 80GB HBM3",
        "date": "2026-12-06",
        "source": "benchmarks/device_fa4.sh at 39a790a (benchmarks/results/2026-12-06-h100-s4/3_fa4): "
                  "FlashAttention-4 4.0.0b40 549/573/641 TFLOP/s vs cuDNN 510/528/550 at W1 block 5 / W1 steady / "
                  "14B, same max error vs fp32; W1 fd bench steady 394.0 vs 441.7 ms, graphs replayed",
    },
}


def fastest_measured(capability: tuple[int, int], installed: Callable[[str], bool],
                     head_dim: int | None = None) -> str:
    """The first backend of the row that is installed and, when ``head_dim`` is given, was measured at it."""
    row = MEASURED.get(tuple(capability))
    if row is None:
        return "auto"
    for name in row["ranking"]:
        if name == "auto":
            return name
        measured_at = row.get("head_dims", {}).get(name)
        if installed(name) and (head_dim is None or measured_at is None or head_dim in measured_at):
            return name
    return "auto"
