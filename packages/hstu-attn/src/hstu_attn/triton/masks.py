"""The HSTU attention mask and the tile ranges it leaves worth visiting, as Triton device functions.

The rules are those of `hstu_attn.reference` (its module docstring): for a sequence of length n with u = n - t
history tokens, contextual prefix c and window w,

    valid(i, j) = (i == j or (j < u and (j < min(i, u) if causal else True)))
                  and (w == 0 or i == j or |min(i, u) - j| <= w)
                  or (i < c and j < u) or (j < c and j < u)

restricted to i, j < n. The range helpers return, for one block of query rows (forward, dq) or one block of key
columns (dk/dv), the span that can hold valid pairs split into masked edges and an interior of whole tiles where
every pair is valid, so interior tiles skip the mask arithmetic. A masked span's last tile may reach past the
span's end: kernels clip masked tiles to `< end`, so consecutive spans never count a pair twice.

In masked tiles a zero weight must not multiply an operand entry (0 * nan = nan): `non_finite` finds the entries
a kernel replaces by 0 there before the product; a valid pair still gets its NaN through its score or, for v and
dO, through a NaN weight (`zero_non_finite_rows` flags the rows).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def valid_mask(
    rows,
    cols,
    n,
    u,
    contextual_seq_len,
    max_attn_len,
    CAUSAL: tl.constexpr,
    HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """Boolean tile valid(rows, cols); `rows` and `cols` are broadcastable in-sequence positions."""
    history_col = cols < u
    row_pos = tl.minimum(rows, u)
    if CAUSAL:
        base = history_col & (cols < row_pos)
    else:
        base = history_col
    if HAS_WINDOW:
        distance = row_pos - cols
        if CAUSAL:
            base = base & (distance <= max_attn_len)
        else:
            base = base & (tl.abs(distance) <= max_attn_len)
    valid = base | (rows == cols)
    if HAS_CONTEXT:
        valid = valid | (((rows < contextual_seq_len) | (cols < contextual_seq_len)) & history_col)
    return valid & (rows < n) & (cols < n)


@triton.jit
def non_finite(x):
    """Boolean tile: which entries of `x` are inf or nan (`x - x` is 0 exactly for every finite x).

    Compared in fp32 (exact for every input dtype; the CPU interpreter mishandles bf16 arithmetic)."""
    wide = x.to(tl.float32)
    return (wide - wide) != 0.0


@triton.jit
def zero_non_finite_rows(x):
    """(`x` with its inf/nan entries replaced by 0, boolean vector: which rows of the 2-D tile held one)."""
    bad = non_finite(x)
    return tl.where(bad, 0.0, x), tl.max(tl.where(bad, 1, 0), axis=1) > 0


@triton.jit
def query_block_column_ranges(
    m0,
    n,
    u,
    contextual_seq_len,
    max_attn_len,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """Key columns that query rows [m0, m0 + BLOCK_M) may attend, as disjoint spans.

    Returns (ctx_end, lo, full_lo, full_hi, hi, diag_lo, diag_hi): masked [0, ctx_end), masked [lo, full_lo),
    unmasked whole tiles [full_lo, full_hi), masked [full_hi, hi), masked [diag_lo, diag_hi).
    """
    m1 = tl.minimum(m0 + BLOCK_M, n)
    row_lo = tl.minimum(m0, u)
    row_hi = tl.minimum(m1 - 1, u)
    if HAS_WINDOW:
        lo = tl.maximum(row_lo - max_attn_len, 0)
        full_lo = tl.maximum(row_hi - max_attn_len, 0)
    else:
        lo = 0
        full_lo = 0
    if CAUSAL:
        hi = tl.minimum(m1, u)
        full_end = row_lo
    elif HAS_WINDOW:
        hi = tl.minimum(row_hi + max_attn_len + 1, u)
        full_end = tl.minimum(row_lo + max_attn_len + 1, u)
    else:
        hi = u
        full_end = u
    ctx_end = 0
    if HAS_CONTEXT:
        if m0 < contextual_seq_len:
            # contextual query rows attend every history column: the whole span is masked
            hi = tl.maximum(hi, u)
            full_end = 0
        contextual_cols = tl.minimum(contextual_seq_len, u)
        if contextual_cols >= lo:
            lo = 0
            hi = tl.maximum(hi, contextual_cols)
        else:
            ctx_end = contextual_cols
    full_end = tl.minimum(full_end, hi)
    # start the interior a whole number of tiles after `lo`, so the masked edge before it is whole tiles too
    full_lo = lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(full_lo, tl.maximum(full_end, lo))
    full_hi = full_lo + (tl.maximum(full_end - full_lo, 0) // BLOCK_N) * BLOCK_N
    diag_lo = tl.maximum(m0, hi)
    return ctx_end, lo, full_lo, full_hi, hi, diag_lo, m1


@triton.jit
def key_block_row_ranges(
    n0,
    n,
    u,
    contextual_seq_len,
    max_attn_len,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_CONTEXT: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """Query rows that may attend key columns [n0, n0 + BLOCK_N), as disjoint spans.

    Returns (ctx_end, lo, full_lo, full_hi, hi): masked [0, ctx_end), masked [lo, full_lo), unmasked whole
    tiles [full_lo, full_hi), masked [full_hi, hi).
    """
    n1 = tl.minimum(n0 + BLOCK_N, n)
    ctx_end = 0
    if n0 >= u:
        # target columns: only their own rows attend them
        lo = n0
        hi = n1
        full_lo = n0
        full_hi = n0
    else:
        col_hi = tl.minimum(n1, u) - 1
        if CAUSAL:
            lo = n0
        elif HAS_WINDOW:
            lo = tl.maximum(n0 - max_attn_len, 0)
        else:
            lo = 0
        if HAS_WINDOW:
            if u - col_hi <= max_attn_len:
                hi = n
            else:
                hi = tl.maximum(tl.minimum(col_hi + max_attn_len + 1, u), n1)
        else:
            hi = n
        full_lo = lo
        full_end = lo
        if n0 + BLOCK_N <= u:
            if CAUSAL:
                full_lo = n0 + BLOCK_N
            elif HAS_WINDOW:
                full_lo = tl.maximum(n0 + BLOCK_N - 1 - max_attn_len, 0)
            else:
                full_lo = 0
            full_end = n
            if HAS_WINDOW:  # noqa: SIM102 (a compile-time test cannot join a run-time one)
                if u > n0 + max_attn_len:
                    full_end = n0 + max_attn_len + 1
            full_lo = lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK_M) * BLOCK_M
            full_lo = tl.minimum(full_lo, hi)
            full_end = tl.minimum(tl.maximum(full_end, full_lo), hi)
        full_hi = full_lo + ((full_end - full_lo) // BLOCK_M) * BLOCK_M
        if HAS_CONTEXT:
            if n0 < tl.minimum(contextual_seq_len, u):
                # contextual key columns are attended by every row
                lo = 0
                hi = n
            contextual_rows = tl.minimum(contextual_seq_len, n)
            if contextual_rows >= lo:
                lo = 0
                hi = tl.maximum(hi, contextual_rows)
            else:
                ctx_end = contextual_rows
    return ctx_end, lo, full_lo, full_hi, hi
