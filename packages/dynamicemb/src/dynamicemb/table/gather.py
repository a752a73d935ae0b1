"""Gather of value rows by slot, with missing slots (-1) read as zeros.

``gather_rows`` is what a lookup does after ``find``: ``out[i] = values[slots[i]]``. On CUDA it is
one Triton kernel that reads whole rows with wide loads (``torch.index_select`` reaches about half
the device bandwidth on random rows); elsewhere it is the torch expression.
"""

from __future__ import annotations

import torch
import triton

from dynamicemb.table.triton_kernels import gather_rows_kernel

_TILE_ELEMENTS = 4096


def gather_rows(values: torch.Tensor, slots: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """``values [C, D]``, ``slots [N]`` int64 (``-1``: missing) -> ``[N, D]`` rows, zeros where missing.

    ``use_triton``: force the Triton kernel (``True``, e.g. under ``TRITON_INTERPRET=1``) or the torch
    expression (``False``); by default Triton on CUDA.
    """
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D [capacity, dim], got shape {tuple(values.shape)}")
    if slots.dtype != torch.int64 or slots.dim() != 1:
        raise ValueError(f"slots must be a 1-D int64 tensor, got {slots.dtype} of shape {tuple(slots.shape)}")
    if slots.device != values.device:
        raise ValueError(f"slots are on {slots.device} but values are on {values.device}")
    if use_triton is None:
        use_triton = values.is_cuda
    n, dim = slots.numel(), values.shape[1]
    if not use_triton:
        out = values.index_select(0, slots.clamp_min(0))
        return out.masked_fill_((slots < 0)[:, None], 0)
    out = torch.empty(n, dim, dtype=values.dtype, device=values.device)
    if n == 0 or dim == 0:
        return out
    if values.stride(1) != 1:
        values = values.contiguous()
    block_d = min(triton.next_power_of_2(dim), 128)
    rows = max(16, min(256, _TILE_ELEMENTS // block_d))
    gather_rows_kernel[(triton.cdiv(n, rows),)](
        values, slots, out, n, dim, values.stride(0), out.stride(0), ROWS=rows, BLOCK_D=block_d
    )
    return out
