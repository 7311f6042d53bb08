"""Triton kernels (GPU). Import a submodule only when triton is wanted: `@triton.jit` reads TRITON_INTERPRET when the
kernel is decorated, i.e. at import time."""
