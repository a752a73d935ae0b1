"""Learned position and time encodings added to token embeddings before the HSTU layers."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gr_models.configs.hstu_config import PositionEncodingConfig


def time_buckets(age: Tensor, fn: str, divisor: float, num_buckets: int) -> Tensor:
    """Bucket `[N]` int64 of non-negative ages (query time minus token time): fn(age / divisor), clamped."""
    scaled = age.clamp_min(0).to(torch.float32) / divisor
    if fn == "sqrt":
        bucket = torch.sqrt(scaled)
    elif fn == "log":
        bucket = torch.log1p(scaled)
    else:
        raise ValueError(f"unknown time bucket function {fn!r}; expected 'sqrt' or 'log'")
    return bucket.floor().clamp(0, num_buckets - 1).to(torch.int64)


class PositionTimeEncoder(nn.Module):
    """Adds `position_table[position]` (and `time_table[bucket(age)]`) to token embeddings.

    Args:
        config: bucket counts and the time bucketing function.
        dim: embedding width.
    """

    def __init__(self, config: PositionEncodingConfig, dim: int) -> None:
        super().__init__()
        self.config = config
        self.position_table = nn.Parameter(self._initial_table(config.num_position_buckets, dim))
        self.time_table = (
            nn.Parameter(self._initial_table(config.num_time_buckets, dim)) if config.use_time_encoding else None
        )

    def _initial_table(self, rows: int, dim: int) -> Tensor:
        """`[rows, dim]`: uniform in +-1/sqrt(dim), or truncated normal (at 2 std) of `config.init_std`."""
        if self.config.init_std is None:
            bound = 1.0 / math.sqrt(dim)
            return torch.empty(rows, dim).uniform_(-bound, bound)
        std = self.config.init_std
        return nn.init.trunc_normal_(torch.empty(rows, dim), std=std, a=-2 * std, b=2 * std)

    def forward(self, values: Tensor, positions: Tensor, ages: Tensor | None) -> Tensor:
        """`values [N, D]` + encodings of `positions [N]` (clamped to the table) and `ages [N]` (time encoding).

        `ages` is required when the config enables time encoding.
        """
        index = positions.clamp(0, self.config.num_position_buckets - 1)
        encoded = values + self.position_table.index_select(0, index).to(values.dtype)
        if self.time_table is not None:
            if ages is None:
                raise ValueError(
                    "time encoding is enabled but the batch has no timestamp feature (set timestamp_feature_name)"
                )
            buckets = time_buckets(
                ages, self.config.time_bucket_fn, self.config.time_bucket_divisor, self.config.num_time_buckets
            )
            encoded = encoded + self.time_table.index_select(0, buckets).to(values.dtype)
        return encoded
