"""Triton dK/dV kernel of jagged HSTU attention.

With `A = SiLU(S) * valid * scale`, `O = A V`, `S = alpha Q K^T + bias`, the backward is

    dV = A^T dO,   dS = (dO V^T) * SiLU'(S) * valid * scale,   dK = alpha dS^T Q,   dQ = alpha dS K,

and the bias gradients are dS itself (`rab`) or its sums per table entry (position and time tables).
No softmax, so nothing from the forward is needed beyond the inputs.

`hstu_attn_backward_dkdv_kernel`: one program per block of BLOCK_N keys of one (sequence, head); it walks the
query blocks that attend those keys, accumulates dK and dV in registers, and adds the bias gradients. It also
adds dQ with fp32 atomics when ATOMIC_DQ; the deterministic alternative is `hstu_attn.triton.backward_dq`.
With `PASS` 1 and 2 (two launches, `LaunchConfig.split_dkdv`) a program accumulates dV only, then dK only (with
dQ and the bias gradients): one `[BLOCK_N, D]` accumulator per program instead of two, for one more product.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hstu_attn.triton.activation import mma, silu_and_grad
from hstu_attn.triton.bias import (
    accumulate_position_grad_transposed,
    accumulate_time_grad,
    score_bias,
    time_buckets,
)
from hstu_attn.triton.masks import key_block_row_ranges, non_finite, valid_mask, zero_non_finite_rows
from hstu_attn.triton.tile import head_rows, head_start, history_length, tile_sequence


@triton.jit
def _backward_dkdv_span(
    dk,
    dv,
    time_acc,
    k,
    v,
    start,
    end,
    offs_n,
    col_in,
    ts_cols,
    q_ptr,
    do_ptr,
    dq_ptr,
    stride_qm,
    stride_dom,
    stride_dqm,
    rab_ptr,
    stride_rab_m,
    stride_rab_n,
    drab_ptr,
    stride_drab_m,
    stride_drab_n,
    pos_ptr,
    dpos_ptr,
    pos_reach,
    time_ptr,
    ts_ptr,
    inv_divisor,
    num_buckets,
    n0,
    n,
    u,
    max_seq_len,
    alpha,
    scale,
    contextual_seq_len,
    max_attn_len,
    DQK: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_RAB: tl.constexpr,
    HAS_DRAB: tl.constexpr,
    DRAB_ATOMIC: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    NUM_BUCKETS_P2: tl.constexpr,
    FAST_SILU: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    WANT_DV: tl.constexpr,
    WANT_DK: tl.constexpr,
):
    offs_dqk = tl.arange(0, DQK)
    offs_dv = tl.arange(0, DV)
    k_for_dq = k
    if MASKED and ATOMIC_DQ:
        k_for_dq = tl.where(non_finite(k), 0.0, k)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_in = offs_m < n
        q_ptrs = q_ptr + offs_m[:, None].to(tl.int64) * stride_qm + offs_dqk[None, :]
        do_ptrs = do_ptr + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :]
        if MASKED:
            # Masked tiles: inf/nan rows of q and dO enter the products as 0 (a zero weight times nan would be
            # nan); their scores become NaN instead, so only valid pairs, through value and grad, carry it.
            q, bad_q = zero_non_finite_rows(tl.load(q_ptrs, mask=row_in[:, None], other=0.0))
            do, bad_do = zero_non_finite_rows(tl.load(do_ptrs, mask=row_in[:, None], other=0.0))
        else:
            q = tl.load(q_ptrs)
        scores_t = mma(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST_DOT, INPUT_PRECISION)
        y = scores_t * alpha
        if MASKED:
            y = tl.where((bad_q | bad_do)[None, :], float("nan"), y)
        buckets = None
        if HAS_TIME:
            ts_rows = tl.load(ts_ptr + offs_m, mask=row_in, other=0)[None, :]
            buckets = time_buckets(ts_rows, ts_cols, inv_divisor, num_buckets)
        if HAS_RAB or HAS_POS or HAS_TIME:
            y += score_bias(
                offs_m[None, :],
                offs_n[:, None],
                row_in[None, :],
                col_in[:, None],
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
        value, grad = silu_and_grad(y, FAST_SILU)
        if MASKED:
            valid = valid_mask(
                offs_m[None, :],
                offs_n[:, None],
                n,
                u,
                contextual_seq_len,
                max_attn_len,
                CAUSAL,
                HAS_CONTEXT,
                HAS_WINDOW,
            )
            valid = valid & (offs_m[None, :] < end)
            value = tl.where(valid, value, 0.0)
        else:
            do = tl.load(do_ptrs)
        if WANT_DV:
            dv = mma(value.to(do.dtype), do, dv, UPCAST_DOT, INPUT_PRECISION)
        if WANT_DK:
            dp_t = mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST_DOT, INPUT_PRECISION)
            ds_t = dp_t * grad
            if MASKED:
                ds_t = tl.where(valid, ds_t, 0.0)
            dk = mma(ds_t.to(q.dtype), q, dk, UPCAST_DOT, INPUT_PRECISION)
            if ATOMIC_DQ:
                dq = mma(
                    tl.trans(ds_t).to(k.dtype),
                    k_for_dq,
                    tl.zeros([BLOCK_M, DQK], dtype=tl.float32),
                    UPCAST_DOT,
                    INPUT_PRECISION,
                )
                dq_ptrs = dq_ptr + offs_m[:, None].to(tl.int64) * stride_dqm + offs_dqk[None, :]
                tl.atomic_add(dq_ptrs, dq * (alpha * scale), mask=row_in[:, None], sem="relaxed")
            if HAS_DRAB or HAS_POS or HAS_TIME:
                ds_scaled = ds_t * scale
                if HAS_DRAB:
                    drab_ptrs = (
                        drab_ptr + offs_m[None, :].to(tl.int64) * stride_drab_m + offs_n[:, None] * stride_drab_n
                    )
                    drab_mask = row_in[None, :] & col_in[:, None]
                    if DRAB_ATOMIC:
                        tl.atomic_add(drab_ptrs, ds_scaled, mask=drab_mask, sem="relaxed")
                    else:
                        tl.store(drab_ptrs, ds_scaled.to(drab_ptr.dtype.element_ty), mask=drab_mask)
                if HAS_POS:
                    accumulate_position_grad_transposed(
                        ds_scaled, n0 - m0, dpos_ptr, pos_reach, max_seq_len, BLOCK_N, BLOCK_M, DETERMINISTIC
                    )
                if HAS_TIME:
                    if MASKED:
                        first = tl.min(tl.min(tl.where(valid, buckets, num_buckets), axis=1), axis=0)
                        last = tl.max(tl.max(tl.where(valid, buckets, -1), axis=1), axis=0)
                    else:
                        first = tl.min(tl.min(buckets, axis=1), axis=0)
                        last = tl.max(tl.max(buckets, axis=1), axis=0)
                    time_acc = accumulate_time_grad(time_acc, ds_scaled, buckets, first, last, NUM_BUCKETS_P2)
    return dk, dv, time_acc


@triton.jit
def hstu_attn_backward_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV_out,
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
    drab,
    position_weights,
    dposition,
    time_weights,
    dtime,
    timestamps,
    stride_rab_b,
    stride_rab_h,
    stride_rab_m,
    stride_rab_n,
    stride_drab_b,
    stride_drab_h,
    stride_drab_m,
    stride_drab_n,
    stride_pos_h,
    stride_dpos_h,
    stride_time_h,
    stride_dtime_h,
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
    HAS_DRAB: tl.constexpr,
    DRAB_ATOMIC: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    NUM_BUCKETS_P2: tl.constexpr,
    FAST_SILU: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PASS: tl.constexpr = 0,
):
    # PASS 0: dK, dV and the rest in one launch; 1: dV only; 2: dK, dQ (atomics) and the bias gradients only
    want_dv: tl.constexpr = PASS != 2
    want_dk: tl.constexpr = PASS != 1
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(max_seq_len, BLOCK_N)
    seq, head, block, seq_start, n = tile_sequence(pid, num_n_blocks, num_heads, seq_offsets, batch_order, HAS_ORDER)
    n0 = block * BLOCK_N
    # q, k, v, grad_out: any token and head strides (passed); dk, dv and dq are contiguous [L, H, D]
    stride_dqm = num_heads * DQK
    stride_dkm = stride_dqm
    stride_dvm = num_heads * DV
    if n0 >= n:
        return
    u = history_length(num_targets, seq, n, HAS_TARGETS)

    offs_n = n0 + tl.arange(0, BLOCK_N)
    col_in = offs_n < n
    k = tl.load(head_rows(K, seq_start, head, offs_n, stride_km, stride_kh, DQK), mask=col_in[:, None], other=0.0)
    v = tl.load(head_rows(V, seq_start, head, offs_n, stride_vm, stride_vh, DV), mask=col_in[:, None], other=0.0)
    q_ptr = head_start(Q, seq_start, head, stride_qm, stride_qh)
    do_ptr = head_start(DO, seq_start, head, stride_dom, stride_doh)
    dq_ptr = DQ
    if ATOMIC_DQ:
        dq_ptr = head_start(DQ, seq_start, head, stride_dqm, DQK)

    rab_ptr = rab
    if HAS_RAB:
        rab_ptr = rab + seq.to(tl.int64) * stride_rab_b + head.to(tl.int64) * stride_rab_h
    drab_ptr = drab
    if HAS_DRAB:
        drab_ptr = drab + seq.to(tl.int64) * stride_drab_b + head.to(tl.int64) * stride_drab_h
    pos_ptr = position_weights
    dpos_ptr = dposition
    if HAS_POS:
        pos_ptr = position_weights + head * stride_pos_h
        if DETERMINISTIC:
            dpos_ptr = dposition + pid.to(tl.int64) * stride_dpos_h
        else:
            dpos_ptr = dposition + head * stride_dpos_h
    time_ptr = time_weights
    ts_ptr = timestamps
    ts_cols = None
    if HAS_TIME:
        time_ptr = time_weights + head * stride_time_h
        ts_ptr = timestamps + seq_start
        ts_cols = tl.load(ts_ptr + offs_n, mask=col_in, other=0)[:, None]
    time_acc = tl.zeros([NUM_BUCKETS_P2], dtype=tl.float32)

    dk = tl.zeros([BLOCK_N, DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DV], dtype=tl.float32)
    ctx_end, lo, full_lo, full_hi, hi = key_block_row_ranges(
        n0, n, u, contextual_seq_len, max_attn_len, BLOCK_M, BLOCK_N, CAUSAL, HAS_CONTEXT, HAS_WINDOW
    )
    # Spans: contextual rows, masked edge, unmasked interior, masked edge. With a bias the interior split is
    # skipped (span 1 covers [lo, hi)): half the code to compile.
    split: tl.constexpr = not (HAS_RAB or HAS_POS or HAS_TIME)
    spans_start = (0, lo, full_lo, full_hi)
    spans_end = (ctx_end, full_lo if split else hi, full_hi, hi)
    for span in tl.static_range(4):
        if (span != 0 or HAS_CONTEXT) and (split or (span != 2 and span != 3)):
            dk, dv, time_acc = _backward_dkdv_span(
                dk,
                dv,
                time_acc,
                k,
                v,
                spans_start[span],
                spans_end[span],
                offs_n,
                col_in,
                ts_cols,
                q_ptr,
                do_ptr,
                dq_ptr,
                stride_qm,
                stride_dom,
                stride_dqm,
                rab_ptr,
                stride_rab_m,
                stride_rab_n,
                drab_ptr,
                stride_drab_m,
                stride_drab_n,
                pos_ptr,
                dpos_ptr,
                pos_reach,
                time_ptr,
                ts_ptr,
                inv_divisor,
                num_buckets,
                n0,
                n,
                u,
                max_seq_len,
                alpha,
                scale,
                contextual_seq_len,
                max_attn_len,
                DQK,
                DV,
                BLOCK_M,
                BLOCK_N,
                span != 2,
                CAUSAL,
                HAS_CONTEXT,
                HAS_WINDOW,
                HAS_RAB,
                HAS_DRAB,
                DRAB_ATOMIC,
                HAS_POS,
                HAS_TIME,
                ATOMIC_DQ,
                DETERMINISTIC,
                NUM_BUCKETS_P2,
                FAST_SILU,
                UPCAST_DOT,
                INPUT_PRECISION,
                want_dv,
                want_dk,
            )

    dk_ptrs = head_rows(DK, seq_start, head, offs_n, stride_dkm, DQK, DQK)
    dv_ptrs = head_rows(DV_out, seq_start, head, offs_n, stride_dvm, DV, DV)
    if want_dk:
        tl.store(dk_ptrs, (dk * (alpha * scale)).to(DK.dtype.element_ty), mask=col_in[:, None])
    if want_dv:
        tl.store(dv_ptrs, (dv * scale).to(DV_out.dtype.element_ty), mask=col_in[:, None])
    if HAS_TIME and want_dk:
        bucket_ids = tl.arange(0, NUM_BUCKETS_P2)
        if DETERMINISTIC:
            tl.store(dtime + pid.to(tl.int64) * stride_dtime_h + bucket_ids, time_acc, mask=bucket_ids < num_buckets)
        else:
            tl.atomic_add(
                dtime + head * stride_dtime_h + bucket_ids, time_acc, mask=bucket_ids < num_buckets, sem="relaxed"
            )
