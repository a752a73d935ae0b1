"""Triton kernels that copy value rows by slot (launched by :mod:`dynamicemb.storage.row_moves`).

``gather_rows_kernel`` and ``scatter_rows_kernel`` copy whole rows with wide accesses; their ``split``
variants do the same for rows split between device memory and pinned host memory.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gather_rows_kernel(
    values_ptr,
    slots_ptr,
    out_ptr,
    n,
    dim,
    values_stride,
    out_stride,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``out[i] = values[slots[i]]`` for ``n`` rows of ``dim`` elements; rows of slot -1 are zeros."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = rows < n
    slot = tl.load(slots_ptr + rows, mask=live, other=-1)
    hit = slot >= 0
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        in_row = (cols < dim)[None, :]
        row = tl.load(values_ptr + slot[:, None] * values_stride + cols[None, :], mask=hit[:, None] & in_row, other=0)
        tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], row, mask=live[:, None] & in_row)


@triton.jit
def scatter_rows_kernel(
    rows_ptr,
    slots_ptr,
    values_ptr,
    n,
    dim,
    rows_stride,
    values_stride,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``values[slots[i]] = rows[i]`` for ``n`` rows of ``dim`` elements; rows of slot -1 are skipped."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = rows < n
    slot = tl.load(slots_ptr + rows, mask=live, other=-1)
    hit = slot >= 0
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        move = hit[:, None] & (cols < dim)[None, :]
        row = tl.load(rows_ptr + rows[:, None] * rows_stride + cols[None, :], mask=move, other=0)
        tl.store(values_ptr + slot[:, None] * values_stride + cols[None, :], row, mask=move)


@triton.jit
def _split_tile(slots_ptr, n, device_rows, ROWS: tl.constexpr):
    """This program's ``ROWS`` row indexes, which are live (``< n``), their slots (-1 past ``n``), and
    whether each slot's row is in the device part (``0 <= slot < device_rows``) or the host part.
    Masked-off lanes never dereference their address, so the callers do not clamp the row indexes
    (a ``tl.where`` there fails Triton 3.6's layout pass at some tile shapes)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = rows < n
    slot = tl.load(slots_ptr + rows, mask=live, other=-1)
    return rows, live, slot, (slot >= 0) & (slot < device_rows), slot >= device_rows


@triton.jit
def gather_split_rows_kernel(
    device_ptr,
    host_ptr,
    slots_ptr,
    out_ptr,
    n,
    dim,
    device_rows,
    device_stride,
    host_stride,
    out_stride,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``out[i]`` = row ``slots[i]`` of a store split in two: slots below ``device_rows`` in the device
    part, the others at ``slot - device_rows`` in the host part (pinned host memory, read over the bus
    on a GPU); rows of slot -1 are zeros."""
    rows, live, slot, on_device, on_host = _split_tile(slots_ptr, n, device_rows, ROWS)
    host_slot = slot - device_rows
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        in_row = (cols < dim)[None, :]
        near = tl.load(
            device_ptr + slot[:, None] * device_stride + cols[None, :], mask=on_device[:, None] & in_row, other=0
        )
        far = tl.load(
            host_ptr + host_slot[:, None] * host_stride + cols[None, :], mask=on_host[:, None] & in_row, other=0
        )
        row = tl.where(on_device[:, None] & in_row, near, far)
        tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], row, mask=live[:, None] & in_row)


@triton.jit
def scatter_split_rows_kernel(
    rows_ptr,
    slots_ptr,
    device_ptr,
    host_ptr,
    n,
    dim,
    device_rows,
    rows_stride,
    device_stride,
    host_stride,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Row ``slots[i]`` of a split store (as in :func:`gather_split_rows_kernel`) ``= rows[i]``;
    rows of slot -1 are skipped."""
    rows, _, slot, on_device, on_host = _split_tile(slots_ptr, n, device_rows, ROWS)
    host_slot = slot - device_rows
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        in_row = (cols < dim)[None, :]
        row = tl.load(
            rows_ptr + rows[:, None] * rows_stride + cols[None, :],
            mask=(on_device | on_host)[:, None] & in_row,
            other=0,
        )
        tl.store(device_ptr + slot[:, None] * device_stride + cols[None, :], row, mask=on_device[:, None] & in_row)
        tl.store(host_ptr + host_slot[:, None] * host_stride + cols[None, :], row, mask=on_host[:, None] & in_row)
