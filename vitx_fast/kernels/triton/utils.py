"""Launch settings and dtype helpers shared by the Triton launchers."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vitx_fast.engine.dispatch import KERNEL_FAMILIES

MAX_BLOCK = 2**14  # elements of the largest tile a program holds in registers


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
    """Device and dtype as the triton kernel family declares them (CPU tensors only under TRITON_INTERPRET=1)."""
    reasons = KERNEL_FAMILIES["triton"].not_supported_reasons(t)
    if reasons:
        raise ValueError(f"{op}: " + "; ".join(reasons))
