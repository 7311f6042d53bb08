"""Launch settings and dtype helpers shared by the Triton launchers."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_BLOCK = 2**14  # elements of the largest tile a program holds in registers


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1, tests and debugging)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def calculate_settings(n: int) -> int:
    """Next power of two >= n (a tl.arange length), at least 2."""
    return max(2, triton.next_power_of_2(int(n)))


def num_warps_for(tile: int) -> int:
    """Warps for a program holding `tile` elements: small tiles waste threads, large ones spill registers."""
    if tile >= 8192:
        return 8
    if tile >= 2048:
        return 4
    return 2 if tile >= 512 else 1


def acc_dtype(dtype: torch.dtype):
    """Accumulate in float32, or in float64 for float64 inputs."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_device(op: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not (t.device.type == "cpu" and interpreting()):
        raise ValueError(f"{op}: the Triton kernel needs CUDA tensors (CPU only under TRITON_INTERPRET=1), "
                         f"got device {t.device}")
    if t.dtype not in DTYPES:
        raise ValueError(f"{op}: the Triton kernel supports {', '.join(str(d) for d in DTYPES)}, got {t.dtype}")
