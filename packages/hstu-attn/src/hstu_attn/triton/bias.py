"""Attention-score bias terms and their gradients, as Triton device functions.

Three optional terms are added to `alpha * q k^T`: a materialized `rab [B, H or 1, N, N]` (indexed by in-sequence
positions) and the fused relative bias of `hstu_attn.relative_bias.RelativeBias`: a position table
`[Hb, 2M - 1]` indexed by `clamp(j - i, -(M-1), M-1) + M - 1` and a time table `[Hb, NB]` indexed by the log
bucket of `|t_j - t_i|`. The fused terms cost O(N) memory: no `[B, H, N, N]` tensor exists in either pass.

Every helper takes `rows` and `cols` as broadcastable position tiles, so the same code serves the forward's
`[rows, cols]` tiles and the backward's transposed `[cols, rows]` tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def time_buckets(ts_rows, ts_cols, inv_divisor, num_buckets):
    """`clamp(floor(log(max(|t_col - t_row|, 1)) / divisor), 0, NB - 1)` as int32 (difference in input dtype)."""
    magnitude = tl.abs(ts_cols - ts_rows).to(tl.float32)
    magnitude = tl.maximum(magnitude, 1.0)
    bucket = tl.floor(tl.log(magnitude) * inv_divisor)
    bucket = tl.minimum(tl.maximum(bucket, 0.0), (num_buckets - 1).to(tl.float32))
    return bucket.to(tl.int32)


@triton.jit
def score_bias(
    rows,
    cols,
    row_in,
    col_in,
    rab_ptr,
    stride_rab_m,
    stride_rab_n,
    pos_ptr,
    pos_reach,
    time_ptr,
    buckets,
    HAS_RAB: tl.constexpr,
    HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr,
):
    """fp32 bias tile for in-sequence positions (rows, cols); `row_in`/`col_in` say which exist (< n).

    `buckets` is the `time_buckets` tile of the same positions (used when HAS_TIME).
    """
    bias = tl.zeros_like(rows + cols).to(tl.float32)
    if HAS_RAB:
        bias += tl.load(
            rab_ptr + rows.to(tl.int64) * stride_rab_m + cols * stride_rab_n, mask=row_in & col_in, other=0.0
        ).to(tl.float32)
    if HAS_POS:
        distance = tl.minimum(tl.maximum(cols - rows, -pos_reach), pos_reach)
        bias += tl.load(pos_ptr + distance + pos_reach).to(tl.float32)
    if HAS_TIME:
        bias += tl.load(time_ptr + buckets).to(tl.float32)
    return bias


@triton.jit
def accumulate_position_grad_transposed(
    ds_t,
    base_distance,
    dpos_ptr,
    pos_reach,
    max_seq_len,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):
    """Add the diagonal sums of `ds_t [BLOCK_N cols, BLOCK_M rows]` to the position-table gradient.

    Entry (jj, ii) has distance `base_distance + jj - ii`. Rows are skewed with a gather so that each diagonal
    becomes a column, giving one atomic per distance instead of one per element. Non-deterministic mode adds
    into the clamped table row `dpos_ptr`; deterministic mode adds into this program's private row of
    unclamped distances (`d + max_seq_len - 1`, folded by the caller), with a barrier after each tile so that
    successive tiles reach a given address in program order.
    """
    jj = tl.arange(0, BLOCK_N)[:, None]
    kk = tl.arange(0, BLOCK_M)[None, :]
    skewed = tl.gather(ds_t, (jj + kk) % BLOCK_M, axis=1)
    wrap = (jj + kk) // BLOCK_M
    k1 = tl.arange(0, BLOCK_M)
    for w in tl.static_range((BLOCK_N + BLOCK_M - 2) // BLOCK_M + 1):
        sums = tl.sum(tl.where(wrap == w, skewed, 0.0), axis=0)
        d_rel = w * BLOCK_M - k1
        in_tile = (d_rel > -BLOCK_M) & (d_rel < BLOCK_N)
        distance = base_distance + d_rel
        if DETERMINISTIC:
            tl.atomic_add(dpos_ptr + distance + max_seq_len - 1, sums, mask=in_tile, sem="relaxed")
        else:
            clamped = tl.minimum(tl.maximum(distance, -pos_reach), pos_reach) + pos_reach
            tl.atomic_add(dpos_ptr + clamped, sums, mask=in_tile, sem="relaxed")
    if DETERMINISTIC:
        tl.debug_barrier()


@triton.jit
def accumulate_time_grad(acc, ds, buckets, first_bucket, last_bucket, NUM_BUCKETS_P2: tl.constexpr):
    """Add per-bucket sums of the 2-D tile `ds` (over buckets first..last) into the register vector `acc`."""
    bucket_ids = tl.arange(0, NUM_BUCKETS_P2)
    for b in range(first_bucket, last_bucket + 1):
        total = tl.sum(tl.sum(tl.where(buckets == b, ds, 0.0), axis=1), axis=0)
        acc = tl.where(bucket_ids == b, acc + total, acc)
    return acc
