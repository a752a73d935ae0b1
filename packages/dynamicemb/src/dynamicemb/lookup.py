"""Embedding lookup of a batch of ids with the fused optimizer step in its backward."""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from dynamicemb.deterministic import ordered_segment_sum
from dynamicemb.embedding_table import DynamicEmbeddingTable, LookupHandle

__all__ = ["dynamic_embedding_lookup"]


def _unique(keys: torch.Tensor, with_counts: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if with_counts:
        unique, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        return unique, inverse, counts
    unique, inverse = torch.unique(keys, return_inverse=True)
    return unique, inverse, None


class _DynamicEmbeddingLookup(torch.autograd.Function):
    """Forward: deduplicate ids, look the unique keys up (inserting new ones), expand back.
    Backward: sum the gradients of duplicate ids (``index_add_``; in deterministic mode
    :func:`~dynamicemb.deterministic.ordered_segment_sum`, the same bits for any order of the ids)
    and apply the table's fused optimizer to those rows; no gradient flows anywhere else.

    ``anchor`` is an empty tensor requiring grad: the table's rows are not autograd leaves, so the
    output needs an input that makes autograd call this backward.

    No ids: the output ``[0, dim]`` still takes part in autograd (as TorchRec's collections'
    outputs do), and its backward touches nothing (no row, no optimizer step).
    """

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, keys: torch.Tensor, table: DynamicEmbeddingTable) -> torch.Tensor:
        ctx.table = None
        if keys.numel() == 0:
            return torch.zeros((0, table.dim), dtype=table.dtype, device=table.device)
        deterministic = table.deterministic
        unique, inverse, counts = _unique(keys, table.needs_counts or deterministic)
        embeddings, handle = table.lookup(unique, counts if table.needs_counts else None, training=True)
        ctx.table = table
        ctx.handle = handle
        ctx.num_unique = unique.numel()
        ctx.save_for_backward(inverse, counts if deterministic else None)
        return embeddings.index_select(0, inverse)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[None, None, None]:
        table: DynamicEmbeddingTable | None = ctx.table
        if table is None:
            return None, None, None
        inverse, counts = ctx.saved_tensors
        handle: LookupHandle = ctx.handle
        if counts is not None:
            grads = ordered_segment_sum(grad_output, inverse, counts)
        else:
            grads = torch.zeros((ctx.num_unique, table.dim), dtype=torch.float32, device=grad_output.device)
            grads.index_add_(0, inverse, grad_output.float())
        table.apply_gradients(handle, grads)
        return None, None, None


def dynamic_embedding_lookup(table: DynamicEmbeddingTable, ids: torch.Tensor, *, training: bool) -> torch.Tensor:
    """``ids [N]`` (int64, duplicates allowed, on ``table.device``) -> embeddings ``[N, dim]``.

    ``training`` with autograd enabled: new keys are inserted and the backward of the result
    updates the rows with the table's fused optimizer. ``training`` under ``torch.no_grad``:
    new keys are inserted, nothing is updated. Not ``training``: nothing is inserted; missing keys
    get the eval initializer's values. No ids: ``[0, dim]`` zeros (with autograd on in training, a
    result that requires grad and whose backward does nothing).

    Synchronizations with the device per call: ``torch.unique`` (its output size), the
    positions of new and of stored keys (``nonzero``), and those of the hash table itself.
    """
    if training and torch.is_grad_enabled():
        anchor = torch.empty(0, device=table.device, requires_grad=True)
        return _DynamicEmbeddingLookup.apply(anchor, ids, table)
    if ids.numel() == 0:
        return torch.zeros((0, table.dim), dtype=table.dtype, device=table.device)
    unique, inverse, counts = _unique(ids, table.needs_counts)
    embeddings, _ = table.lookup(unique, counts, training=training)
    return embeddings.index_select(0, inverse)
