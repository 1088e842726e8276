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
        "ranking": ("auto",),
        "device": "NVIDIA H100 80GB HBM3",
        "date": "2026-11-24",
        "source": "shared/baselines h100_floor_2026-11-24.jsonl: cuDNN SDPA 453-533 TFLOP/s, torch flash 264-311, "
                  "efficient ~160 at the W1 shapes; FlashAttention-4 not yet measured",
    },
}


def fastest_measured(capability: tuple[int, int], installed: Callable[[str], bool]) -> str:
    row = MEASURED.get(tuple(capability))
    if row is None:
        return "auto"
    for name in row["ranking"]:
        if name == "auto" or installed(name):
            return name
    return "auto"
