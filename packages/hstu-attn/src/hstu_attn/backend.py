"""Kernel backend selection for `hstu_attn_varlen_func`."""

from __future__ import annotations

import enum
import functools
import importlib

import torch

__all__ = ["TRITON_DTYPES", "TRITON_HEAD_DIMS", "KernelBackend", "resolve_backend", "triton_backend_available"]

TRITON_HEAD_DIMS = (32, 64, 128, 256)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_ENTRY_POINTS = ("hstu_attn_triton_forward", "hstu_attn_triton_backward")


class KernelBackend(str, enum.Enum):
    """Which implementation computes the attention.

    PYTORCH: the reference (`hstu_attn.reference`), any floating dtype (float64 included), any device.
    TRITON: the Triton kernels; float32/bfloat16/float16, head dims 32/64/128/256, CUDA tensors (or CPU tensors
        under `TRITON_INTERPRET=1`).
    CUTLASS: the compiled CUTLASS/CuTe kernels (bfloat16/float16, head dims 64/128/256, backward 64/128 with the
        Triton backward for 256 and for deterministic=True beside a fused relative bias or a rab shared by the heads;
        materialized rab and fused relative bias supported) when the package was built with HSTU_ATTN_BUILD_CUDA=1,
        else NotImplementedError saying how to build it. AUTO never picks it.
    AUTO: TRITON when the inputs are CUDA tensors it supports and Triton imports, else PYTORCH.
    """

    PYTORCH = "pytorch"
    TRITON = "triton"
    CUTLASS = "cutlass"
    AUTO = "auto"


@functools.cache
def triton_backend_available() -> bool:
    """Whether `hstu_attn.triton` (and so Triton itself) imports in this process and provides the kernels."""
    try:
        kernels = importlib.import_module("hstu_attn.triton")
    except ImportError:
        return False
    return all(hasattr(kernels, name) for name in TRITON_ENTRY_POINTS)


def triton_supports(dtype: torch.dtype, head_dim_qk: int, head_dim_v: int) -> bool:
    """Whether the Triton kernels handle this dtype and these head dims."""
    return dtype in TRITON_DTYPES and head_dim_qk in TRITON_HEAD_DIMS and head_dim_v in TRITON_HEAD_DIMS


def resolve_backend(backend: KernelBackend, q: torch.Tensor, head_dim_v: int) -> KernelBackend:
    """The concrete backend (PYTORCH, TRITON or CUTLASS) that AUTO or an explicit choice stands for."""
    if backend is not KernelBackend.AUTO:
        return backend
    if q.is_cuda and triton_supports(q.dtype, q.shape[-1], head_dim_v) and triton_backend_available():
        return KernelBackend.TRITON
    return KernelBackend.PYTORCH
