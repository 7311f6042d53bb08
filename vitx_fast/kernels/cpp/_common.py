"""Shared plumbing of the C++ wrappers: the loaded module, input checks and zero-copy numpy views."""
from __future__ import annotations

import torch

from vitx_fast import _ext
from vitx_fast.engine.dispatch import CPP_DTYPES


def native(op: str):
    """The loaded `vitx_fast._C`, or a RuntimeError that says why it is missing."""
    if not _ext.is_available():
        raise RuntimeError(f"{op}: the native module vitx_fast._C is not available ({_ext.import_error()}); "
                           "rebuild with `pip install --no-build-isolation -e .`")
    return _ext._C


def check_cpu_float(op: str, t: torch.Tensor) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"{op}: the C++ kernel runs on CPU tensors, got device {t.device}")
    if t.dtype not in CPP_DTYPES:
        raise ValueError(f"{op}: the C++ kernel supports float32 and float64, got {t.dtype}")


def view(t: torch.Tensor):
    """A C-contiguous numpy view sharing memory with `t` (copies only when `t` is strided or needs conjugation)."""
    return t.detach().contiguous().resolve_conj().resolve_neg().numpy()


def threads() -> int:
    """Use the threads torch was told to use (torch.set_num_threads), so both sides of a comparison are fair."""
    return torch.get_num_threads()
