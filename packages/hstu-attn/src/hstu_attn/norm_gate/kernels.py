"""Triton kernels of `y = dropout(LayerNorm(x) * u)` over the rows of `[L, W]` matrices.

Each program holds `BLOCK_L` whole rows (`BLOCK_W` >= W columns, the tail masked) in fp32 registers. The dropout
mask is Philox(seed, row, column) >= p (`_dropout_scale`): the backward draws the same numbers from the same seed
instead of reading a saved mask. The backward programs walk row blocks `pid, pid + G, ...` and write their
partial sums of dweight and dbias to row `pid` of `[G, W]` buffers, which the caller sums (no atomics:
deterministic).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_block(start, rows, width, BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr):
    """int64 row indices, column indices, row mask and `[BLOCK_L, BLOCK_W]` mask of the rows from `start`."""
    row = (start + tl.arange(0, BLOCK_L)).to(tl.int64)
    col = tl.arange(0, BLOCK_W)
    row_ok = row < rows
    mask = row_ok[:, None] & (col < width)[None, :]
    return row, col, row_ok, mask


@triton.jit
def _dropout_scale(SEED, row, width, p, scale, BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr):
    """`[BLOCK_L, BLOCK_W]` fp32: `scale` where the element's uniform draw is >= p, else 0.

    One Philox call (`rand4x`, counter `row * ceil(W / 4) + j`) gives the draws of columns `4j .. 4j + 3` of a row,
    a quarter of the integer work of one call per element. The draws depend on (seed, row, column) only, not on
    the block shape, so the forward and backward programs regenerate the same mask.
    """
    seed = tl.load(SEED)
    quads = (width + 3) // 4
    counter = row[:, None] * quads + tl.arange(0, BLOCK_W // 4)[None, :]
    r0, r1, r2, r3 = tl.rand4x(seed, counter)
    # [BLOCK_L, BLOCK_W // 4, 2, 2] -> [BLOCK_L, BLOCK_W]: column 4j + k takes r0, r2, r1, r3 for k = 0, 1, 2, 3
    random = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_L, BLOCK_W))
    return tl.where(random >= p, scale, 0.0)


@triton.jit(do_not_specialize=["rows"])  # the token count changes every batch: one compile, not two
def layer_norm_gate_forward_kernel(
    X,  # [L, W], row stride stride_x, column stride 1
    U,  # [L, W], row stride stride_u, column stride 1
    Y,  # [L, W] output, row stride stride_y
    WEIGHT,  # [W] (unused without HAS_WEIGHT)
    BIAS,  # [W] (unused without HAS_BIAS)
    MEAN,  # [L] fp32 output
    RSTD,  # [L] fp32 output
    SEED,  # [1] int64 (unused without DROPOUT)
    rows,
    width,
    stride_x,
    stride_u,
    stride_y,
    eps,
    p,
    scale,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    row, col, row_ok, mask = _row_block(tl.program_id(0) * BLOCK_L, rows, width, BLOCK_L, BLOCK_W)
    x = tl.load(X + row[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / width
    centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / width + eps)
    normed = centered * rstd[:, None]
    if HAS_WEIGHT:
        normed = normed * tl.load(WEIGHT + col, mask=col < width, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        normed = normed + tl.load(BIAS + col, mask=col < width, other=0.0).to(tl.float32)[None, :]
    u = tl.load(U + row[:, None] * stride_u + col[None, :], mask=mask, other=0.0).to(tl.float32)
    y = normed * u
    if DROPOUT:
        y = y * _dropout_scale(SEED, row, width, p, scale, BLOCK_L, BLOCK_W)
    tl.store(Y + row[:, None] * stride_y + col[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean, mask=row_ok)
    tl.store(RSTD + row, rstd, mask=row_ok)


@triton.jit(do_not_specialize=["rows"])
def layer_norm_gate_backward_kernel(
    DY,  # [L, W] gradient of y, row stride stride_dy
    X,
    U,
    WEIGHT,
    BIAS,
    MEAN,
    RSTD,
    SEED,
    DX,  # [L, W] output, row stride stride_dx
    DU,  # [L, W] output, row stride stride_du
    DWEIGHT,  # [G, W] fp32 partial sums (unused without HAS_WEIGHT)
    DBIAS,  # [G, W] fp32 partial sums (unused without HAS_BIAS)
    rows,
    width,
    stride_dy,
    stride_x,
    stride_u,
    stride_dx,
    stride_du,
    p,
    scale,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    col = tl.arange(0, BLOCK_W)
    col_ok = col < width
    if HAS_WEIGHT:
        weight = tl.load(WEIGHT + col, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + col, mask=col_ok, other=0.0).to(tl.float32)
    dweight = tl.zeros([BLOCK_W], dtype=tl.float32)
    dbias = tl.zeros([BLOCK_W], dtype=tl.float32)
    for start in range(pid * BLOCK_L, rows, programs * BLOCK_L):
        row, _, row_ok, mask = _row_block(start, rows, width, BLOCK_L, BLOCK_W)
        x = tl.load(X + row[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + row, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        grad = tl.load(DY + row[:, None] * stride_dy + col[None, :], mask=mask, other=0.0).to(tl.float32)
        if DROPOUT:
            grad = grad * _dropout_scale(SEED, row, width, p, scale, BLOCK_L, BLOCK_W)
        normed = xhat
        if HAS_WEIGHT:
            normed = normed * weight[None, :]
        if HAS_BIAS:
            normed = normed + bias[None, :]
        tl.store(DU + row[:, None] * stride_du + col[None, :], (grad * normed).to(DU.dtype.element_ty), mask=mask)
        u = tl.load(U + row[:, None] * stride_u + col[None, :], mask=mask, other=0.0).to(tl.float32)
        dnormed = grad * u
        dxhat = dnormed
        if HAS_WEIGHT:
            dweight += tl.sum(dnormed * xhat, axis=0)
            dxhat = dnormed * weight[None, :]
        if HAS_BIAS:
            dbias += tl.sum(dnormed, axis=0)
        mean_dxhat = tl.sum(dxhat, axis=1) / width
        mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / width
        dx = (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None]) * rstd[:, None]
        tl.store(DX + row[:, None] * stride_dx + col[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(DWEIGHT + pid * width + col, dweight, mask=col_ok)
    if HAS_BIAS:
        tl.store(DBIAS + pid * width + col, dbias, mask=col_ok)
