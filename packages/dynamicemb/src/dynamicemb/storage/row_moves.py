"""Value rows moved by slot: gathered (missing slots, -1, read as zeros) and scattered (-1 skipped).

``gather_rows`` is what a lookup does after ``find``: ``out[i] = values[slots[i]]``;
``scatter_rows`` is what an insertion does after ``insert_and_evict``: ``values[slots[i]] = rows[i]``
where the key was placed. On CUDA each is one Triton kernel that moves whole rows with wide accesses
(``torch.index_select`` reaches about half the device bandwidth on random rows, and a masked
``index_copy_`` needs a compaction first); elsewhere they are torch expressions.

``gather_split_rows`` and ``scatter_split_rows`` do the same for rows split between a device part
(slots below ``device_rows``) and a host part in pinned memory. On CUDA one kernel reaches both parts:
pinned host memory is mapped into the device's address space (unified virtual addressing), so host
rows cross the bus inside the kernel, with no host synchronization and no staging copy.
"""

from __future__ import annotations

import torch
import triton

from dynamicemb.masks import positions
from dynamicemb.storage.row_kernels import (
    gather_rows_kernel,
    gather_split_rows_kernel,
    scatter_rows_kernel,
    scatter_split_rows_kernel,
)
from dynamicemb.triton_launch import BoundKernel, num_programs

__all__ = ["gather_rows", "gather_split_rows", "scatter_rows", "scatter_split_rows"]

_TILE_ELEMENTS = 4096
# Launched without Triton's per-call argument binding after each variant's first launch.
_GATHER_ROWS = BoundKernel(gather_rows_kernel)
_SCATTER_ROWS = BoundKernel(scatter_rows_kernel)
_GATHER_SPLIT_ROWS = BoundKernel(gather_split_rows_kernel)
_SCATTER_SPLIT_ROWS = BoundKernel(scatter_split_rows_kernel)


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
    _GATHER_ROWS(
        num_programs(n, rows), values, slots, out, n, dim, values.stride(0), out.stride(0), ROWS=rows, BLOCK_D=block_d
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
        placed = positions(slots >= 0)
        values.index_copy_(0, slots[placed], rows[placed])
        return
    n, dim = slots.numel(), values.shape[1]
    if n == 0 or dim == 0:
        return
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    tile_rows, block_d = _tile(dim)
    _SCATTER_ROWS(
        num_programs(n, tile_rows),
        rows,
        slots,
        values,
        n,
        dim,
        rows.stride(0),
        values.stride(0),
        ROWS=tile_rows,
        BLOCK_D=block_d,
    )


def _check_split(device_part: torch.Tensor, host_part: torch.Tensor, slots: torch.Tensor) -> None:
    if device_part.dim() != 2 or host_part.dim() != 2 or device_part.shape[1] != host_part.shape[1]:
        raise ValueError(
            "a split store needs device and host parts [rows, D] of one width, got "
            f"{tuple(device_part.shape)} and {tuple(host_part.shape)}"
        )
    if device_part.dtype != host_part.dtype:
        raise ValueError(f"the device part is {device_part.dtype} but the host part is {host_part.dtype}")
    if device_part.stride(1) != 1 or host_part.stride(1) != 1:
        raise ValueError("the parts of a split store need unit column stride")
    if slots.dtype != torch.int64 or slots.dim() != 1:
        raise ValueError(f"slots must be a 1-D int64 tensor, got {slots.dtype} of shape {tuple(slots.shape)}")
    if slots.device != device_part.device:
        raise ValueError(f"slots are on {slots.device} but the device part is on {device_part.device}")
    if host_part.device.type != "cpu":
        raise ValueError(f"the host part must be in host memory, got {host_part.device}")
    if device_part.is_cuda and host_part.numel() and not host_part.is_pinned():
        raise ValueError("the host part must be pinned for a CUDA kernel to reach it")


def gather_split_rows(device_part: torch.Tensor, host_part: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of a store split in two: ``device_part [R, D]`` holds slots ``[0, R)``, ``host_part [H, D]``
    (host memory, pinned on CUDA) slots ``[R, R + H)``. ``slots [N]`` int64 (``-1``: missing) ->
    ``[N, D]`` on ``device_part``'s device, zeros where missing. ``D`` may be a leading-columns view.
    One Triton kernel (on a CPU device only under ``TRITON_INTERPRET=1``)."""
    _check_split(device_part, host_part, slots)
    n, dim, device_rows = slots.numel(), device_part.shape[1], device_part.shape[0]
    out = torch.empty(n, dim, dtype=device_part.dtype, device=device_part.device)
    if n == 0 or dim == 0:
        return out
    tile_rows, block_d = _tile(dim)
    _GATHER_SPLIT_ROWS(
        num_programs(n, tile_rows),
        device_part,
        host_part,
        slots,
        out,
        n,
        dim,
        device_rows,
        device_part.stride(0),
        host_part.stride(0),
        out.stride(0),
        ROWS=tile_rows,
        BLOCK_D=block_d,
    )
    return out


def scatter_split_rows(
    device_part: torch.Tensor, host_part: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor
) -> None:
    """``rows [N, D]`` (cast to the parts' dtype) into distinct ``slots [N]`` int64 (``-1``: skipped) of
    a store split as in :func:`gather_split_rows`, in place; one Triton kernel."""
    _check_split(device_part, host_part, slots)
    if rows.dim() != 2 or rows.shape != (slots.numel(), device_part.shape[1]):
        raise ValueError(
            f"rows must be [{slots.numel()}, {device_part.shape[1]}] (one per slot), got {tuple(rows.shape)}"
        )
    if rows.device != device_part.device:
        raise ValueError(f"rows are on {rows.device} but the device part is on {device_part.device}")
    n, dim, device_rows = slots.numel(), device_part.shape[1], device_part.shape[0]
    if n == 0 or dim == 0:
        return
    rows = rows.to(device_part.dtype)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    tile_rows, block_d = _tile(dim)
    _SCATTER_SPLIT_ROWS(
        num_programs(n, tile_rows),
        rows,
        slots,
        device_part,
        host_part,
        n,
        dim,
        device_rows,
        rows.stride(0),
        device_part.stride(0),
        host_part.stride(0),
        ROWS=tile_rows,
        BLOCK_D=block_d,
    )


def _tile(dim: int) -> tuple[int, int]:
    """(rows per program, columns per step) of the row kernels for rows of ``dim`` elements."""
    block_d = min(triton.next_power_of_2(dim), 128)
    return max(16, min(256, _TILE_ELEMENTS // block_d)), block_d
