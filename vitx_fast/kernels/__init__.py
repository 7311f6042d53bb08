"""Kernels of the fused ops, one file per op and backend, the same name and signature in every backend directory.

- `reference/<op>.py`: plain torch (einsum), any device and dtype; the ground truth and the benchmark baseline.
- `triton/<op>.py`: a `@triton.jit` kernel and its launcher; selected for CUDA tensors (on CPU only under
  TRITON_INTERPRET=1, for tests).
- `cpp/<op>.py`: the C++ CPU kernel of `vitx_fast._C` (csrc/<op>/<op>_cpu.cpp), float32 and float64.

The public functionals that pick one live in `vitx_fast.ops`. None of these kernels is differentiable.
"""
