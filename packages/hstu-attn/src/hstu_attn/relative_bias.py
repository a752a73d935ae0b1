"""Learnable relative attention bias (position + time), the HSTU paper's rab at O(N) parameters.

For query token i and key token j of the same sequence (0-based positions in that sequence), head h:

    position term = position_weights[h', clamp(j - i, -(M-1), M-1) + (M-1)]
    time term     = time_weights[h', bucketize_time_delta(t_j - t_i, time_bucket_divisor, NB)]
    bias(i, j, h) = sum of the terms whose tables are present

with `M = (position_weights.shape[1] + 1) // 2`, `NB = time_weights.shape[1]`, and `h' = h` when the table has
one row per head, `h' = 0` when it has a single shared row. The bias is added to `S = alpha * q k^T` before the
SiLU, exactly like a materialized `rab`. The Triton backend computes it inside the kernels; `materialize` builds
the dense `[B, Hb, N, N]` tensor for the PyTorch reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hstu_attn._jagged import jagged_to_padded, token_coordinates

__all__ = ["RelativeBias", "bucketize_time_delta"]


def bucketize_time_delta(delta: Tensor, divisor: float, num_buckets: int) -> Tensor:
    """Bucket index (int64, same shape as `delta`) of a time difference: log-spaced buckets.

    `bucket = clamp(floor(log(max(|delta|, 1)) / divisor), 0, num_buckets - 1)`, where `|delta|` is taken in the
    dtype of `delta` (exact for integer timestamps) and the logarithm, division and floor are computed in float32.
    A |delta| whose exact log lies within a float32 rounding step of a bucket edge may land in the neighbouring
    bucket here (and in the Triton kernels); the CUTLASS SM80-style forward gave the exact log's bucket to every pair
    of a 379,836-pair probe (tools/gpu/relative_bucket_probe.py).
    """
    magnitude = delta.abs().to(torch.float32).clamp_min(1.0)
    buckets = torch.floor(torch.log(magnitude) / divisor)
    return buckets.clamp(0, num_buckets - 1).to(torch.int64)


@dataclass
class RelativeBias:
    """Position and/or time bias tables (at least one), shared across the batch.

    Attributes:
        position_weights: `[Hb, 2*M - 1]` floating, or None. Column `d + (M-1)` holds the bias of relative
            distance `d = j - i` (key position minus query position); distances beyond `M-1` are clamped.
        time_weights: `[Hb, NB]` floating, or None. Column `b` holds the bias of time bucket `b`
            (see `bucketize_time_delta`). Needs `timestamps`.
        timestamps: `[L]` integer or floating, one per token in the same jagged layout as q, or None.
        time_bucket_divisor: positive width of a bucket in natural-log units.

    `Hb` is 1 (one row shared by all heads) or the number of heads H; the two tables may differ in `Hb`.
    """

    position_weights: Tensor | None = None
    time_weights: Tensor | None = None
    timestamps: Tensor | None = None
    time_bucket_divisor: float = 0.301

    def __post_init__(self) -> None:
        if self.position_weights is None and self.time_weights is None:
            raise ValueError("RelativeBias needs position_weights, time_weights or both; got neither")
        if self.position_weights is not None:
            shape = tuple(self.position_weights.shape)
            if len(shape) != 2 or shape[1] % 2 != 1:
                raise ValueError(
                    f"RelativeBias.position_weights must have shape [Hb, 2*M - 1] (odd width); got {shape}"
                )
            if not self.position_weights.is_floating_point():
                raise ValueError(
                    f"RelativeBias.position_weights must be floating point; got {self.position_weights.dtype}"
                )
        if self.time_weights is not None:
            shape = tuple(self.time_weights.shape)
            if len(shape) != 2 or shape[1] < 1:
                raise ValueError(f"RelativeBias.time_weights must have shape [Hb, NB] with NB >= 1; got {shape}")
            if not self.time_weights.is_floating_point():
                raise ValueError(f"RelativeBias.time_weights must be floating point; got {self.time_weights.dtype}")
            if self.timestamps is None:
                raise ValueError("RelativeBias.time_weights needs RelativeBias.timestamps ([L], one per token)")
            if self.timestamps.dim() != 1:
                raise ValueError(f"RelativeBias.timestamps must have shape [L]; got {tuple(self.timestamps.shape)}")
            if self.timestamps.dtype == torch.bool or self.timestamps.is_complex():
                raise ValueError(f"RelativeBias.timestamps must be integer or floating; got {self.timestamps.dtype}")
        if not self.time_bucket_divisor > 0:
            raise ValueError(f"RelativeBias.time_bucket_divisor must be > 0; got {self.time_bucket_divisor}")

    @property
    def max_relative_distance(self) -> int:
        """`M - 1`: the largest |j - i| with its own position bias (0 when there is no position table)."""
        if self.position_weights is None:
            return 0
        return (self.position_weights.shape[1] - 1) // 2

    @property
    def num_time_buckets(self) -> int:
        """`NB`: the number of time buckets (0 when there is no time table)."""
        return 0 if self.time_weights is None else self.time_weights.shape[1]

    def check_num_heads(self, num_heads: int) -> None:
        """Raise ValueError unless every table has 1 row or `num_heads` rows."""
        for name, table in (("position_weights", self.position_weights), ("time_weights", self.time_weights)):
            if table is not None and table.shape[0] not in (1, num_heads):
                raise ValueError(
                    f"RelativeBias.{name} has {table.shape[0]} rows; expected 1 (shared) or {num_heads} (one per head)"
                )

    def position_columns(self, max_seq_len: int, device: torch.device) -> Tensor:
        """`[N, N]` int64: the position-table column of each (query i, key j) pair."""
        positions = torch.arange(max_seq_len, device=device)
        reach = self.max_relative_distance
        return (positions[None, :] - positions[:, None]).clamp(-reach, reach) + reach

    def time_buckets(self, seq_offsets: Tensor, max_seq_len: int) -> Tensor:
        """`[B, N, N]` int64: the time-table column of each (query i, key j) pair of each sequence."""
        assert self.timestamps is not None
        coordinates = token_coordinates(seq_offsets, self.timestamps.numel())
        padded_times = jagged_to_padded(self.timestamps, coordinates, seq_offsets.numel() - 1, max_seq_len)
        delta = padded_times[:, None, :] - padded_times[:, :, None]
        return bucketize_time_delta(delta, self.time_bucket_divisor, self.num_time_buckets)

    def materialize(self, seq_offsets: Tensor, max_seq_len: int, num_heads: int) -> Tensor:
        """The dense bias `[B, Hb, N, N]` (N = max_seq_len), differentiable w.r.t. both weight tables.

        `Hb` is `num_heads` when either table has one row per head, else 1. Entries at padded positions
        (beyond a sequence's length) are arbitrary; the attention mask discards them.
        """
        self.check_num_heads(num_heads)
        num_sequences = seq_offsets.numel() - 1
        bias_terms = []
        if self.position_weights is not None:
            columns = self.position_columns(max_seq_len, seq_offsets.device)
            bias_terms.append(self.position_weights[:, columns].unsqueeze(0))
        if self.time_weights is not None:
            buckets = self.time_buckets(seq_offsets, max_seq_len)
            bias_terms.append(self.time_weights[:, buckets].transpose(0, 1))
        bias = bias_terms[0] if len(bias_terms) == 1 else bias_terms[0] + bias_terms[1]
        return bias.expand(num_sequences, bias.shape[1], max_seq_len, max_seq_len)

    def table_gradients(self, grad_bias: Tensor, seq_offsets: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The adjoint of `materialize`: gradients of (position_weights, time_weights) from `grad_bias [B, H, N, N]`.

        Entries of `grad_bias` at padded positions must be zero. Each gradient has its table's shape and dtype
        (None for an absent table).
        """
        max_seq_len = grad_bias.shape[-1]
        grad_position = grad_time = None
        if self.position_weights is not None:
            per_pair = _sum_heads_to(grad_bias.sum(0), self.position_weights.shape[0])
            columns = self.position_columns(max_seq_len, grad_bias.device).flatten()
            grad_position = _scatter_columns(per_pair.flatten(1), columns, self.position_weights)
        if self.time_weights is not None:
            per_pair = _sum_heads_to(grad_bias.transpose(0, 1), self.time_weights.shape[0])
            buckets = self.time_buckets(seq_offsets, max_seq_len).flatten()
            grad_time = _scatter_columns(per_pair.flatten(1), buckets, self.time_weights)
        return grad_position, grad_time


def _sum_heads_to(grad: Tensor, rows: int) -> Tensor:
    """Sum a `[H, ...]` gradient over heads when the table has a single shared row."""
    return grad.sum(0, keepdim=True) if rows == 1 and grad.shape[0] != 1 else grad


def _scatter_columns(values: Tensor, columns: Tensor, table: Tensor) -> Tensor:
    """`grad[h, c] = sum of values[h, p] over the pairs p with columns[p] == c`, accumulated in float32 or wider."""
    accumulate_dtype = torch.promote_types(values.dtype, torch.float32)
    grad = torch.zeros(table.shape, dtype=accumulate_dtype, device=values.device)
    grad.index_add_(1, columns, values.to(accumulate_dtype))
    return grad.to(table.dtype)
