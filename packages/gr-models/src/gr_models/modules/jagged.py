"""Index arithmetic on jagged (ragged) sequences stored as flat `[N, ...]` values plus per-sequence lengths."""

from __future__ import annotations

import torch
from torch import Tensor


def lengths_to_offsets(lengths: Tensor) -> Tensor:
    """`[B]` lengths -> `[B+1]` int64 offsets starting at 0."""
    lengths = lengths.to(torch.int64)
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def token_coordinates(lengths: Tensor, total: int | None = None) -> tuple[Tensor, Tensor]:
    """For every token of sequences with `lengths [B]`: (its sequence index `[N]`, its position in it `[N]`).

    Pass `total` (= `lengths.sum()`) when it is known to skip reading it back from the device.
    """
    lengths = lengths.to(torch.int64)
    total = int(lengths.sum()) if total is None else total
    sequence_ids = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=total
    )
    starts = lengths_to_offsets(lengths)[:-1]
    positions = torch.arange(total, device=lengths.device) - starts[sequence_ids]
    return sequence_ids, positions


def tail_mask(lengths: Tensor, tail_lengths: Tensor) -> Tensor:
    """Bool `[N]`: True for the last `tail_lengths[b]` tokens of each sequence b."""
    sequence_ids, positions = token_coordinates(lengths)
    lengths = lengths.to(torch.int64)
    return positions >= (lengths - tail_lengths.to(torch.int64))[sequence_ids]


def scatter_rows(sources: list[tuple[Tensor, Tensor]], total: int) -> Tensor:
    """Assemble `[total, ...]` rows from `(values [N_i, ...], destination indices [N_i])` pairs.

    The destinations must cover `0..total-1` exactly once. Implemented as one gather, so gradients flow back
    to every source.
    """
    values = torch.cat([v for v, _ in sources])
    destinations = torch.cat([d for _, d in sources])
    if destinations.numel() != total:
        raise ValueError(f"scatter_rows: {destinations.numel()} source rows for {total} destinations")
    source_of = torch.empty(total, dtype=torch.int64, device=values.device)
    source_of[destinations] = torch.arange(total, device=values.device)
    return values.index_select(0, source_of)
