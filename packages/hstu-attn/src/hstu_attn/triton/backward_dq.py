"""Triton dQ kernel of jagged HSTU attention: `dQ = alpha dS K` (the backward's formulas are in
`hstu_attn.triton.backward_dkdv`).

`hstu_attn_backward_dq_kernel`: the alternative to fp32 atomics in the dK/dV kernel (deterministic, and faster on
long sequences): one program per block of BLOCK_M queries of one (sequence, head), walking its keys like the
forward and writing dQ once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hstu_attn.triton.activation import mma, silu_and_grad
from hstu_attn.triton.bias import score_bias, time_buckets
from hstu_attn.triton.masks import query_block_column_ranges, valid_mask, zero_non_finite_rows
from hstu_attn.triton.tile import head_rows, head_start, history_length, tile_sequence


@triton.jit
def _backward_dq_span(
    dq,
    q,
    do,
    start,
    end,
    offs_m,
    row_in,
    ts_rows,
    k_ptr,
    v_ptr,
    stride_km,
    stride_vm,
    rab_ptr,
    stride_rab_m,
    stride_rab_n,
    pos_ptr,
    pos_reach,
    time_ptr,
    ts_ptr,
    inv_divisor,
    num_buckets,
    n,
    u,
    alpha,
    contextual_seq_len,
    max_attn_len,
    DQK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_RAB: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr,
    FAST_SILU: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    offs_dqk = tl.arange(0, DQK)
    offs_dv = tl.arange(0, DV)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_in = offs_n < n
        k_ptrs = k_ptr + offs_n[:, None].to(tl.int64) * stride_km + offs_dqk[None, :]
        v_ptrs = v_ptr + offs_n[:, None].to(tl.int64) * stride_vm + offs_dv[None, :]
        if MASKED:
            # masked tiles: inf/nan rows of k enter dQ = dS K as 0 and make their valid pairs' scores NaN instead
            k, bad_k = zero_non_finite_rows(tl.load(k_ptrs, mask=col_in[:, None], other=0.0))
            v = tl.load(v_ptrs, mask=col_in[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        scores = mma(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), UPCAST_DOT, INPUT_PRECISION)
        y = scores * alpha
        if MASKED:
            y = tl.where(bad_k[None, :], float("nan"), y)
        if HAS_RAB or HAS_POS or HAS_TIME:
            buckets = None
            if HAS_TIME:
                ts_cols = tl.load(ts_ptr + offs_n, mask=col_in, other=0)[None, :]
                buckets = time_buckets(ts_rows, ts_cols, inv_divisor, num_buckets)
            y += score_bias(
                offs_m[:, None],
                offs_n[None, :],
                row_in[:, None],
                col_in[None, :],
                rab_ptr,
                stride_rab_m,
                stride_rab_n,
                pos_ptr,
                pos_reach,
                time_ptr,
                buckets,
                HAS_RAB,
                HAS_POS,
                HAS_TIME,
            )
        _, grad = silu_and_grad(y, FAST_SILU)
        dp = mma(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), UPCAST_DOT, INPUT_PRECISION)
        ds = dp * grad
        if MASKED:
            valid = valid_mask(
                offs_m[:, None],
                offs_n[None, :],
                n,
                u,
                contextual_seq_len,
                max_attn_len,
                CAUSAL,
                HAS_CONTEXT,
                HAS_WINDOW,
            )
            ds = tl.where(valid & (offs_n[None, :] < end), ds, 0.0)
        dq = mma(ds.to(k.dtype), k, dq, UPCAST_DOT, INPUT_PRECISION)
    return dq


@triton.jit
def hstu_attn_backward_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    stride_qm,
    stride_qh,
    stride_km,
    stride_kh,
    stride_vm,
    stride_vh,
    stride_dom,
    stride_doh,
    seq_offsets,
    num_targets,
    batch_order,
    rab,
    position_weights,
    time_weights,
    timestamps,
    stride_rab_b,
    stride_rab_h,
    stride_rab_m,
    stride_rab_n,
    stride_pos_h,
    stride_time_h,
    num_heads,
    max_seq_len,
    alpha,
    scale,
    contextual_seq_len,
    max_attn_len,
    pos_reach,
    num_buckets,
    inv_divisor,
    DQK: tl.constexpr,
    DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
    HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_ORDER: tl.constexpr,
    HAS_RAB: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr,
    FAST_SILU: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(max_seq_len, BLOCK_M)
    seq, head, block, seq_start, n = tile_sequence(pid, num_m_blocks, num_heads, seq_offsets, batch_order, HAS_ORDER)
    m0 = (num_m_blocks - 1 - block) * BLOCK_M
    # q, k, v, grad_out: any token and head strides (passed); dq is contiguous [L, H, DQK]
    stride_dqm = num_heads * DQK
    if m0 >= n:
        return
    u = history_length(num_targets, seq, n, HAS_TARGETS)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_in = offs_m < n
    q = tl.load(head_rows(Q, seq_start, head, offs_m, stride_qm, stride_qh, DQK), mask=row_in[:, None], other=0.0)
    do = tl.load(head_rows(DO, seq_start, head, offs_m, stride_dom, stride_doh, DV), mask=row_in[:, None], other=0.0)
    k_ptr = head_start(K, seq_start, head, stride_km, stride_kh)
    v_ptr = head_start(V, seq_start, head, stride_vm, stride_vh)

    rab_ptr = rab
    if HAS_RAB:
        rab_ptr = rab + seq.to(tl.int64) * stride_rab_b + head.to(tl.int64) * stride_rab_h
    pos_ptr = position_weights
    if HAS_POS:
        pos_ptr = position_weights + head * stride_pos_h
    time_ptr = time_weights
    ts_ptr = timestamps
    ts_rows = None
    if HAS_TIME:
        time_ptr = time_weights + head * stride_time_h
        ts_ptr = timestamps + seq_start
        ts_rows = tl.load(ts_ptr + offs_m, mask=row_in, other=0)[:, None]

    ctx_end, lo, full_lo, full_hi, hi, diag_lo, diag_hi = query_block_column_ranges(
        m0, n, u, contextual_seq_len, max_attn_len, BLOCK_M, BLOCK_N, CAUSAL, HAS_CONTEXT, HAS_WINDOW
    )
    dq = tl.zeros([BLOCK_M, DQK], dtype=tl.float32)
    # Spans: contextual columns, masked left edge, unmasked interior, masked right edge, target diagonal.
    # With a bias the interior split is skipped (span 1 covers [lo, hi)): half the code to compile.
    split: tl.constexpr = not (HAS_RAB or HAS_POS or HAS_TIME)
    spans_start = (0, lo, full_lo, full_hi, diag_lo)
    spans_end = (ctx_end, full_lo if split else hi, full_hi, hi, diag_hi)
    for span in tl.static_range(5):
        if (span != 0 or HAS_CONTEXT) and (span != 4 or HAS_TARGETS) and (split or (span != 2 and span != 3)):
            dq = _backward_dq_span(
                dq,
                q,
                do,
                spans_start[span],
                spans_end[span],
                offs_m,
                row_in,
                ts_rows,
                k_ptr,
                v_ptr,
                stride_km,
                stride_vm,
                rab_ptr,
                stride_rab_m,
                stride_rab_n,
                pos_ptr,
                pos_reach,
                time_ptr,
                ts_ptr,
                inv_divisor,
                num_buckets,
                n,
                u,
                alpha,
                contextual_seq_len,
                max_attn_len,
                DQK,
                DV,
                BLOCK_N,
                span != 2,
                CAUSAL,
                HAS_CONTEXT,
                HAS_WINDOW,
                HAS_RAB,
                HAS_POS,
                HAS_TIME,
                FAST_SILU,
                UPCAST_DOT,
                INPUT_PRECISION,
            )

    dq_ptrs = head_rows(DQ, seq_start, head, offs_m, stride_dqm, DQK, DQK)
    tl.store(dq_ptrs, (dq * (alpha * scale)).to(DQ.dtype.element_ty), mask=row_in[:, None])
