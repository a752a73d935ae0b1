"""Value rows moved by slot: gathered (missing slots, -1, read as zeros) and scattered (-1 skipped).

``gather_rows`` is what a lookup does after ``find``: ``out[i] = values[slots[i]]``;
``scatter_rows`` is what an insertion does after ``insert_and_evict``: ``values[slots[i]] = rows[i]``
where the key was placed. On CUDA each is one Triton kernel that moves whole rows with wide accesses
(``torch.index_select`` reaches about half the device bandwidth on random rows, and a masked
``index_copy_`` needs a compaction first); elsewhere they are torch expressions.
"""

from __future__ import annotations

import torch
import triton

from dynamicemb.table.triton_kernels import gather_rows_kernel, scatter_rows_kernel

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
    rows, block_d = _tile(dim)
    gather_rows_kernel[(triton.cdiv(n, rows),)](
        values, slots, out, n, dim, values.stride(0), out.stride(0), ROWS=rows, BLOCK_D=block_d
    )
    return out


def scatter_rows(values: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, use_triton: bool | None = None) -> None:
    """``values [C, D]`` (in place), distinct ``slots [N]`` int64 (``-1``: skip), ``rows [N, D]``
    (cast to ``values.dtype``): ``values[slots[i]] = rows[i]`` for every ``slots[i] >= 0``.

    ``use_triton`` as for :func:`gather_rows`; the Triton kernel needs ``values`` with unit column
    stride (it writes in place)."""
    if values.dim() != 2 or rows.dim() != 2 or rows.shape[1] != values.shape[1]:
        raise ValueError(
            f"scatter_rows needs values [C, D] and rows [N, D], got {tuple(values.shape)} and {tuple(rows.shape)}"
        )
    if slots.dtype != torch.int64 or slots.dim() != 1 or slots.numel() != rows.shape[0]:
        raise ValueError(
            f"slots must be a 1-D int64 tensor of {rows.shape[0]} entries, got {slots.dtype} {tuple(slots.shape)}"
        )
    if slots.device != values.device or rows.device != values.device:
        raise ValueError(
            f"slots ({slots.device}) and rows ({rows.device}) must be on the values' device {values.device}"
        )
    if use_triton is None:
        use_triton = values.is_cuda
    rows = rows.to(values.dtype)
    if not use_triton or values.stride(1) != 1:
        placed = (slots >= 0).nonzero().squeeze(1)
        values.index_copy_(0, slots[placed], rows[placed])
        return
    n, dim = slots.numel(), values.shape[1]
    if n == 0 or dim == 0:
        return
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    tile_rows, block_d = _tile(dim)
    scatter_rows_kernel[(triton.cdiv(n, tile_rows),)](
        rows, slots, values, n, dim, rows.stride(0), values.stride(0), ROWS=tile_rows, BLOCK_D=block_d
    )


def _tile(dim: int) -> tuple[int, int]:
    """(rows per program, columns per step) of the row kernels for rows of ``dim`` elements."""
    block_d = min(triton.next_power_of_2(dim), 128)
    return max(16, min(256, _TILE_ELEMENTS // block_d)), block_d
