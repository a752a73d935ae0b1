"""Deterministic mode: the same results run to run on one device, whatever the order of duplicate ids.

Where results could depend on thread scheduling or on the order of the ids of a batch:

- the gradients of duplicate ids summed with ``index_add_`` (atomic adds on CUDA, in an order that
  changes run to run; on any device the sum depends on the order of the ids): replaced by
  :func:`ordered_segment_sum`, which adds each key's contributions in ascending value order;
- the pooling of bags with ``index_add`` (atomic adds on CUDA): :func:`pool_sorted_segments`, one
  sequential sum per bag;
- the Triton insertion, where keys race for free slots and duplicates race to insert (which key gets a
  contended slot, and with LFU / CUSTOMIZED which one is refused): in deterministic mode the hash index
  places new keys with the torch backend's ordered placement (distinct keys, contenders settled by score
  then key) on the same storage (:class:`~dynamicemb.hash_index.bucketed.BucketedHashTable`).

A table is deterministic when its ``DynamicEmbTableOptions.deterministic`` is ``True``, or when it is
``None`` (the default) and ``torch.are_deterministic_algorithms_enabled()``.
"""

from __future__ import annotations

import torch

__all__ = ["is_deterministic", "ordered_segment_sum", "pool_sorted_segments"]


def is_deterministic(flag: bool | None) -> bool:
    """``flag``, or torch's global setting (``torch.use_deterministic_algorithms``) when ``None``."""
    return torch.are_deterministic_algorithms_enabled() if flag is None else bool(flag)


def ordered_segment_sum(values: torch.Tensor, segments: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Rows summed by segment, bit-identical for any order of the rows.

    ``values [N, D]`` (summed in float32), ``segments [N]`` int64 in ``[0, S)``, ``lengths [S]`` the
    number of rows of each segment (each >= 1) -> ``[S, D]`` float32. Each column of a segment is
    added sequentially in ascending value order: the rows are sorted per column by value, then
    (stably) by segment, and reduced by ``torch.segment_reduce``, one sequential sum per segment and
    column. Costs two sorts of ``[N, D]`` and an ``[N, D]`` int64 temporary.
    """
    if values.dim() != 2 or segments.shape != values.shape[:1]:
        raise ValueError(
            f"ordered_segment_sum needs values [N, D] and segments [N], got {tuple(values.shape)} and "
            f"{tuple(segments.shape)}"
        )
    values = values.float()
    if values.shape[0] == 0:
        return values.new_zeros((lengths.numel(), values.shape[1]))
    by_value = torch.sort(values, dim=0, stable=True)
    owner = segments.unsqueeze(1).expand_as(values).gather(0, by_value.indices)
    by_segment = torch.sort(owner, dim=0, stable=True).indices
    ordered = by_value.values.gather(0, by_segment)
    return torch.segment_reduce(ordered, "sum", lengths=lengths, axis=0, unsafe=True)


def pool_sorted_segments(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``values [N, D]`` whose rows are grouped by bag in order, ``lengths [B]`` (zeros allowed) ->
    ``[B, D]`` sums, one sequential sum per bag and column (an empty bag sums to 0); differentiable."""
    return torch.segment_reduce(values, "sum", lengths=lengths, axis=0, unsafe=True, initial=0.0)
