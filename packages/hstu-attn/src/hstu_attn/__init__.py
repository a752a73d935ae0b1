"""HSTU attention kernels: PyTorch reference, Triton and CUTLASS backends."""

__version__ = "0.1.0"

__all__ = ["__version__"]
