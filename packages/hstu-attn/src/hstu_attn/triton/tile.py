"""Tile setup shared by the forward and backward kernels: which (sequence, head, block) a program computes, the
sequence's bounds, and pointers into `[L, H, D]` tensors for that head (any token and head strides; the last dim
unit-stride). (The bias pointers stay in
each kernel: a jit function cannot return an input that is None, as rab and the tables are when absent.)

Every kernel is launched on `B * H * ceil(max_seq_len / BLOCK)` programs, so the grid is sized without a host
synchronization; a program whose block lies past the end of its sequence exits at once (each kernel checks it).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_sequence(pid, num_blocks, num_heads, seq_offsets, batch_order, HAS_ORDER: tl.constexpr):
    """(seq, head, block, seq_start, n) of program `pid`: its sequence (through `batch_order` when HAS_ORDER) and
    head, its block index within the sequence (0..num_blocks-1; the kernel maps it to rows or columns), the
    sequence's first token (int64) and its length n (int32)."""
    bh = pid // num_blocks
    block = pid % num_blocks
    seq = bh // num_heads
    head = bh % num_heads
    if HAS_ORDER:
        seq = tl.load(batch_order + seq)
    seq_start = tl.load(seq_offsets + seq).to(tl.int64)
    n = (tl.load(seq_offsets + seq + 1) - seq_start).to(tl.int32)
    return seq, head, block, seq_start, n


@triton.jit
def history_length(num_targets, seq, n, HAS_TARGETS: tl.constexpr):
    """u = n - num_targets[seq]: the number of history tokens of the sequence (n without targets)."""
    u = n
    if HAS_TARGETS:
        u = n - tl.load(num_targets + seq).to(tl.int32)
    return u


@triton.jit
def head_start(base, seq_start, head, stride_m, stride_h):
    """Pointer to the sequence's first token, head `head`, of an `[L, H, D]` tensor with token stride `stride_m`
    and head stride `stride_h` (H * D and D when contiguous; 4 * H * D and D for a u/v/q/k split of one
    `[L, 4 * H * D]` projection)."""
    return base + seq_start * stride_m + head.to(tl.int64) * stride_h


@triton.jit
def head_rows(base, seq_start, head, offs, stride_m, stride_h, D: tl.constexpr):
    """Pointers `[len(offs), D]` to the rows `offs` (positions in the sequence) of one head of an `[L, H, D]`
    tensor with token stride `stride_m`, head stride `stride_h` and unit-stride last dim."""
    offs_d = tl.arange(0, D)
    start = head_start(base, seq_start, head, stride_m, stride_h)
    return start + offs[:, None].to(tl.int64) * stride_m + offs_d[None, :]
