"""Index helpers between the jagged layout `[L, ...]` and a padded layout `[B, N, ...]`."""

from __future__ import annotations

import torch
from torch import Tensor


def sequence_lengths(seq_offsets: Tensor) -> Tensor:
    """Lengths `[B]` (int64) of the sequences delimited by `seq_offsets [B+1]`."""
    offsets = seq_offsets.to(torch.int64)
    return offsets[1:] - offsets[:-1]


def token_coordinates(seq_offsets: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """For each of the `num_tokens` jagged tokens: its sequence index and its position in that sequence.

    Returns two int64 tensors of shape `[num_tokens]`.
    """
    offsets = seq_offsets.to(torch.int64)
    num_sequences = offsets.numel() - 1
    sequence_ids = torch.repeat_interleave(
        torch.arange(num_sequences, device=offsets.device), sequence_lengths(offsets), output_size=num_tokens
    )
    positions = torch.arange(num_tokens, device=offsets.device) - offsets[sequence_ids]
    return sequence_ids, positions


def jagged_to_padded(
    values: Tensor, coordinates: tuple[Tensor, Tensor], num_sequences: int, max_seq_len: int
) -> Tensor:
    """Scatter jagged `values [L, ...]` into a zero-filled `[B, N, ...]` tensor (differentiable)."""
    padded = values.new_zeros((num_sequences, max_seq_len, *values.shape[1:]))
    return padded.index_put(coordinates, values)
