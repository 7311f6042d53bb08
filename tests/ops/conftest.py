"""Fused-op tests. On a machine without CUDA the Triton kernels run through Triton's CPU interpreter.

TRITON_INTERPRET is read when `@triton.jit` decorates a kernel, i.e. when `vitx_fast.kernels.triton.<op>` is imported,
so it is set here, before any test module of this directory imports anything. With a GPU it stays unset and the Triton
kernels are tested by the `gpu` tests instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
