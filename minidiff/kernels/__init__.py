"""The opt-in fast path: fused C++ (CPU) and Triton (CUDA) kernels, Winograd convolutions and their autotuner,
reached through ``optimize(unet)``. Nothing here runs unless a model is optimized."""
from .fused import KERNELS
from .fast_path import optimize, restore

__all__ = ["KERNELS", "optimize", "restore"]
