"""Wrappers of the C++ CPU kernels in `vitx_fast._C`: validate, make contiguous, allocate, call through numpy views."""
