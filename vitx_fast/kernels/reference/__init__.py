"""Plain PyTorch kernels: readable maths, any device and dtype, the ground truth of every other backend."""
