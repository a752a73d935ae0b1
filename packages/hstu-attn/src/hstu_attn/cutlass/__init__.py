"""The CUTLASS/CuTe backend: a ctypes binding of `libhstu_attn_cutlass.so`, present only when the package was built
with HSTU_ATTN_BUILD_CUDA=1 (see the package README, "CUTLASS backend")."""

from hstu_attn.cutlass.api import (
    CUTLASS_BACKWARD_HEAD_DIMS,
    CUTLASS_DTYPES,
    CUTLASS_HEAD_DIMS,
    CUTLASS_TIMESTAMP_DTYPES,
    cutlass_available,
    cutlass_unsupported,
    hstu_attn_cutlass_backward,
    hstu_attn_cutlass_forward,
)

__all__ = [
    "CUTLASS_BACKWARD_HEAD_DIMS",
    "CUTLASS_DTYPES",
    "CUTLASS_HEAD_DIMS",
    "CUTLASS_TIMESTAMP_DTYPES",
    "cutlass_available",
    "cutlass_unsupported",
    "hstu_attn_cutlass_backward",
    "hstu_attn_cutlass_forward",
]
