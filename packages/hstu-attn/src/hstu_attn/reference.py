"""PyTorch reference of jagged HSTU attention: the oracle every backend is tested against.

For one sequence of length n with t targets (u = n - t history tokens), contextual prefix c and local window w
(0 = unlimited), query row i may attend key column j (0 <= i, j < n) exactly when

    valid(i, j) = (base(i, j) and in_window(i, j))        # ordinary attention
                  or (i < c and j < u)                     # contextual rows see the whole history
                  or (j < c and j < u)                     # every row sees the contextual prefix

    base(i, j)      = (i == j) or (j < u and (j < min(i, u) if causal else True))
    in_window(i, j) = (w == 0) or (i == j) or |min(i, u) - j| <= w

so, in words:
- causal (default): a history row i < u attends history columns j <= i;
- non-causal: a history row attends every history column (both directions);
- targets: a target row i >= u attends every history column and itself, never another target; no history row
  attends a target, in either mode;
- the local window measures the distance from min(i, u) (a target counts as standing at position u), in both
  directions when non-causal; a row always attends itself and the contextual columns regardless of the window;
- a contextual prefix that reaches into the targets (c > u) exposes only its history part as columns.

With `S = alpha * q k^T + rab + relative_bias`, the output is `O = (SiLU(S) * valid / scaling_seqlen) v`.

Invalid pairs are selected away, never multiplied by zero: a non-finite value (inf/nan) in q, k, v, rab or grad_out
of a token that a row may not attend never reaches that row's output or the gradients it feeds (0 * nan = nan, so
a product `weights @ v` with a zero weight would let it through). A row that does attend a non-finite value gets
NaN: through its score (q, k, rab), or in its whole output row of that head (v; dO for dv).
`hstu_attn_reference` contains its forward this way; autograd through it is exact for finite inputs only,
`hstu_attn_reference_backward` contains the backward too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hstu_attn._jagged import jagged_to_padded, sequence_lengths, token_coordinates
from hstu_attn.relative_bias import RelativeBias

__all__ = ["hstu_attn_reference", "hstu_attn_reference_backward", "hstu_attn_valid_mask"]


def valid_masks(
    lengths: Tensor,
    num_targets: Tensor | None,
    max_seq_len: int,
    *,
    causal: bool,
    contextual_seq_len: int,
    max_attn_len: int,
) -> Tensor:
    """Valid-attention masks `[B, N, N]` (bool) for sequences of `lengths [B]`; padded rows/columns are False."""
    device = lengths.device
    n = lengths.to(torch.int64).view(-1, 1, 1)
    targets = torch.zeros_like(n) if num_targets is None else num_targets.to(device=device, dtype=torch.int64)
    u = n - targets.view(-1, 1, 1)
    i = torch.arange(max_seq_len, device=device).view(1, -1, 1)
    j = torch.arange(max_seq_len, device=device).view(1, 1, -1)
    row_position = torch.minimum(i, u)
    diagonal = i == j
    history_column = j < u

    if causal:
        base = diagonal | (history_column & (j < row_position))
    else:
        base = diagonal | history_column
    if max_attn_len > 0:
        base = base & (diagonal | ((row_position - j).abs() <= max_attn_len))
    valid = base
    if contextual_seq_len > 0:
        contextual_rows = (i < contextual_seq_len) & history_column
        contextual_columns = (j < contextual_seq_len) & history_column
        valid = valid | contextual_rows | contextual_columns
    inside = (i < n) & (j < n)
    return valid & inside


def hstu_attn_valid_mask(
    n: int,
    *,
    causal: bool = True,
    num_targets: int | None = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """The `[n, n]` bool mask of one sequence of length `n`: entry (i, j) says whether query i attends key j.

    Implements the rules in this module's docstring; `num_targets` (t, 0 <= t <= n) defaults to 0.
    """
    lengths = torch.tensor([n], device=device)
    targets = None if num_targets is None else torch.tensor([num_targets], device=device)
    masks = valid_masks(
        lengths,
        targets,
        n,
        causal=causal,
        contextual_seq_len=contextual_seq_len,
        max_attn_len=max_attn_len,
    )
    return masks[0]


def hstu_attn_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    max_seq_len: int,
    *,
    alpha: float | None = None,
    causal: bool = True,
    num_targets: Tensor | None = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    scaling_seqlen: int | None = None,
    rab: Tensor | None = None,
    relative_bias: RelativeBias | None = None,
) -> Tensor:
    """Jagged HSTU attention computed densely (padded to `[B, H, N, N]`) in the dtype of q, k, v.

    Args:
        q, k: `[L, H, Dqk]`; v: `[L, H, Dv]` (same dtype, any floating dtype including float64, any device).
        seq_offsets: `[B+1]` int32/int64, non-decreasing, `seq_offsets[0] == 0`, `seq_offsets[-1] == L`.
        max_seq_len: N, at least the longest sequence.
        alpha: scale of `q k^T`; default `1 / sqrt(Dqk)`.
        causal, num_targets (`[B]` integer, t_b in [0, n_b]), contextual_seq_len, max_attn_len: the mask rules
            of this module's docstring.
        scaling_seqlen: divisor of the attention weights; default `max_seq_len`.
        rab: `[B, H or 1, N, N]` bias added to S (indexed by in-sequence positions), or None.
        relative_bias: position/time bias tables (`RelativeBias`), added to S like `rab`, or None.

    Returns:
        `[L, H, Dv]` in the dtype of q. Differentiable by autograd w.r.t. q, k, v, rab and the bias tables.
    """
    problem = _PaddedProblem(
        q, k, v, seq_offsets, max_seq_len, alpha=alpha, causal=causal, num_targets=num_targets,
        contextual_seq_len=contextual_seq_len, max_attn_len=max_attn_len, rab=rab, relative_bias=relative_bias,
    )  # fmt: skip
    weights = F.silu(problem.masked_scores) / _scaling(scaling_seqlen, max_seq_len)
    padded_out = _selected_product("bhij,bjhd->bihd", weights, problem.valid, problem.v)
    return padded_out[problem.coordinates]


def hstu_attn_reference_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seq_offsets: Tensor,
    max_seq_len: int,
    *,
    alpha: float | None = None,
    causal: bool = True,
    num_targets: Tensor | None = None,
    contextual_seq_len: int = 0,
    max_attn_len: int = 0,
    scaling_seqlen: int | None = None,
    rab: Tensor | None = None,
    relative_bias: RelativeBias | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Explicit gradients of `hstu_attn_reference` (same arguments, plus `grad_out [L, H, Dv]`), without autograd.

    With `P = SiLU(S) * valid / scaling`: `dV = P^T dO`, `dP = dO V^T`, `dS = dP * SiLU'(S) * valid / scaling`,
    `dQ = alpha dS K`, `dK = alpha dS^T Q`, `d_rab = dS` (summed over heads for a shared rab), and the bias-table
    gradients scatter dS into the table columns (`RelativeBias.table_gradients`).

    Returns:
        `(dq, dk, dv, d_rab, d_position_weights, d_time_weights)`, None for absent inputs; each in its input's dtype.
    """
    problem = _PaddedProblem(
        q, k, v, seq_offsets, max_seq_len, alpha=alpha, causal=causal, num_targets=num_targets,
        contextual_seq_len=contextual_seq_len, max_attn_len=max_attn_len, rab=rab, relative_bias=relative_bias,
    )  # fmt: skip
    scaling = _scaling(scaling_seqlen, max_seq_len)
    scores = problem.masked_scores
    sigmoid = torch.sigmoid(scores)
    weights = scores * sigmoid / scaling
    padded_grad_out = jagged_to_padded(grad_out, problem.coordinates, problem.num_sequences, max_seq_len)

    grad_v = _selected_product("bhij,bihd->bjhd", weights, problem.valid, padded_grad_out)
    grad_weights = torch.einsum("bihd,bjhd->bhij", padded_grad_out, problem.v)
    silu_slope = sigmoid * (1 + scores * (1 - sigmoid))
    grad_scores = (grad_weights * silu_slope / scaling).masked_fill(~problem.valid, 0)
    # A non-finite q or k entry of a valid pair already made its score, hence grad_scores, NaN: zeroing it in
    # the operand only keeps it out of the rows and columns that never attend it.
    grad_q = torch.einsum("bhij,bjhd->bihd", grad_scores, _finite_or_zero(problem.k)) * problem.alpha
    grad_k = torch.einsum("bhij,bihd->bjhd", grad_scores, _finite_or_zero(problem.q)) * problem.alpha

    grad_rab = None
    if rab is not None:
        grad_rab = grad_scores.sum(1, keepdim=True) if rab.shape[1] == 1 else grad_scores
        grad_rab = grad_rab.to(rab.dtype)
    grad_position = grad_time = None
    if relative_bias is not None:
        grad_position, grad_time = relative_bias.table_gradients(grad_scores, seq_offsets)
    coordinates = problem.coordinates
    return (
        grad_q[coordinates],
        grad_k[coordinates],
        grad_v[coordinates],
        grad_rab,
        grad_position,
        grad_time,
    )


def _finite_or_zero(x: Tensor) -> Tensor:
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def _selected_product(equation: str, weights: Tensor, valid: Tensor, x: Tensor) -> Tensor:
    """`einsum(equation, weights, x)` where the zero weight of an invalid pair never multiplies an entry of x.

    `weights [B, H, N, N]` is zero at invalid pairs, `valid [B, 1, N, N]`, x padded `[B, N, H, D]`. Non-finite
    entries of x enter the product as 0; an output row (per head) that a valid pair links to a row of x holding
    one is NaN, as the Triton kernels make it (added, so autograd still reaches the finite terms). No host sync:
    which rows are reached is one more product over `[B, N, H]` flags (1/D of the main product's work).
    """
    bad = ~torch.isfinite(x)
    product = torch.einsum(equation, weights, x.masked_fill(bad, 0))
    bad_rows = bad.any(dim=-1).to(weights.dtype)  # [B, N, H]: the rows of x holding a non-finite entry
    row_equation = equation.replace("d", "")  # the same contraction without the feature dimension
    reached = torch.einsum(row_equation, valid.expand_as(weights).to(weights.dtype), bad_rows) > 0
    return product + torch.zeros_like(product).masked_fill(reached.unsqueeze(-1), float("nan"))


def _scaling(scaling_seqlen: float | None, max_seq_len: int) -> float:
    return max_seq_len if scaling_seqlen is None else scaling_seqlen


class _PaddedProblem:
    """The inputs padded to `[B, N, H, D]`, the valid mask `[B, 1, N, N]` and the masked scores `[B, H, N, N]`."""

    def __init__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        seq_offsets: Tensor,
        max_seq_len: int,
        *,
        alpha: float | None,
        causal: bool,
        num_targets: Tensor | None,
        contextual_seq_len: int,
        max_attn_len: int,
        rab: Tensor | None,
        relative_bias: RelativeBias | None,
    ) -> None:
        num_tokens, num_heads, head_dim_qk = q.shape
        self.num_sequences = seq_offsets.numel() - 1
        self.alpha = 1.0 / math.sqrt(head_dim_qk) if alpha is None else alpha
        self.coordinates = token_coordinates(seq_offsets, num_tokens)
        self.q = jagged_to_padded(q, self.coordinates, self.num_sequences, max_seq_len)
        self.k = jagged_to_padded(k, self.coordinates, self.num_sequences, max_seq_len)
        self.v = jagged_to_padded(v, self.coordinates, self.num_sequences, max_seq_len)

        scores = torch.einsum("bihd,bjhd->bhij", self.q, self.k) * self.alpha
        if rab is not None:
            scores = scores + rab.to(scores.dtype)
        if relative_bias is not None:
            scores = scores + relative_bias.materialize(seq_offsets, max_seq_len, num_heads).to(scores.dtype)
        self.valid = valid_masks(
            sequence_lengths(seq_offsets),
            num_targets,
            max_seq_len,
            causal=causal,
            contextual_seq_len=contextual_seq_len,
            max_attn_len=max_attn_len,
        ).unsqueeze(1)
        # Zeroing invalid scores keeps garbage (inf/nan) in padded rab entries out of both passes: SiLU(0) = 0.
        self.masked_scores = scores.masked_fill(~self.valid, 0)
