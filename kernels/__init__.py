"""CUDA C++ kernels (csrc/), their JIT-built bindings, and a PyTorch reference for every kernel."""
