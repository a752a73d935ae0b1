"""The table on Triton kernels: the GPU backend (on CPU only under ``TRITON_INTERPRET=1``, for tests).

``find_or_insert`` is two launches: a lookup that also refreshes the scores of present keys and marks
their slots with the call's epoch, then a lock-free insertion of the rest (see
:mod:`dynamicemb.table.triton_kernels`). With one score for the whole call (TIMESTAMP, STEP,
NO_EVICTION) batches are not deduplicated: duplicate keys meet in the table itself. Per-key scores
(LFU counts, caller scores) are first reduced over duplicates with ``torch.unique``.
"""

from __future__ import annotations

import os

import torch
import triton

from dynamicemb.table.base import InsertResult
from dynamicemb.table.bucketed import BucketedHashTable, ScoreUpdate
from dynamicemb.table.layout import TableStorage
from dynamicemb.table.triton_kernels import (
    SCORE_ADD,
    SCORE_NONE,
    SCORE_PER_KEY,
    SCORE_VALUE,
    insert_kernel,
    lookup_kernel,
)


def _score_args(update: ScoreUpdate | None, keys: torch.Tensor) -> tuple[int, torch.Tensor, int]:
    """(score mode, per-key scores or a placeholder, scalar score) for the kernels."""
    if update is None:
        return SCORE_NONE.value, keys, 0
    if update.accumulate:
        increments = update.values if update.values is not None else torch.ones_like(keys)
        return SCORE_ADD.value, increments, 0
    if update.values is not None:
        return SCORE_PER_KEY.value, update.values, 0
    return SCORE_VALUE.value, keys, update.value


def _reduce_duplicates(keys: torch.Tensor, update: ScoreUpdate) -> tuple[torch.Tensor, torch.Tensor, ScoreUpdate]:
    """Distinct keys, the inverse map, and per-key scores: counts (LFU) or the largest score."""
    unique, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    if update.accumulate:
        return unique, inverse, ScoreUpdate(accumulate=True, values=counts)
    assert update.values is not None
    largest = torch.full_like(unique, torch.iinfo(torch.int64).min).scatter_reduce(0, inverse, update.values, "amax")
    return unique, inverse, ScoreUpdate(values=largest)


def _block_size(device: torch.device) -> int:
    # The interpreter pays per program instance, so it gets few large programs.
    return 256 if device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1" else 128


class TritonHashTable(BucketedHashTable):
    """:class:`BucketedHashTable` on Triton kernels."""

    def _launch_lookup(
        self, storage: TableStorage, keys: torch.Tensor, update: ScoreUpdate | None, epoch: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = keys.numel()
        slots = torch.empty(n, dtype=torch.int64, device=keys.device)
        found = torch.empty(n, dtype=torch.int8, device=keys.device)
        mode, per_key, value = _score_args(update, keys)
        block = _block_size(keys.device)
        lookup_kernel[(triton.cdiv(n, block),)](
            keys,
            n,
            storage.keys,
            storage.digests,
            storage.scores,
            storage.epochs,
            slots,
            found,
            storage.num_buckets,
            per_key,
            value,
            0 if epoch is None else epoch,
            SCORE_MODE=mode,
            MARK_EPOCH=epoch is not None,
            BUCKET=storage.bucket_capacity,
            GROUP=storage.group_size,
            NUM_GROUPS=storage.num_groups,
            BLOCK=block,
        )
        return slots, found

    def _launch_insert(
        self,
        storage: TableStorage,
        keys: torch.Tensor,
        found: torch.Tensor,
        slots: torch.Tensor,
        update: ScoreUpdate,
        epoch: int,
        evict: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inserts in place into ``slots``; returns per-lane (evicted flag, evicted key, its score)."""
        n = keys.numel()
        evicted = torch.empty(n, dtype=torch.int8, device=keys.device)
        evicted_keys = torch.empty(n, dtype=torch.int64, device=keys.device)
        evicted_scores = torch.empty(n, dtype=torch.int64, device=keys.device)
        mode, per_key, value = _score_args(update, keys)
        block = _block_size(keys.device)
        insert_kernel[(triton.cdiv(n, block),)](
            keys,
            n,
            found,
            slots,
            evicted,
            evicted_keys,
            evicted_scores,
            storage.keys,
            storage.digests,
            storage.digests.view(torch.int32),
            storage.scores,
            storage.epochs,
            storage.size,
            storage.num_buckets,
            per_key,
            value,
            epoch,
            SCORE_MODE=mode,
            EVICT=evict,
            BUCKET=storage.bucket_capacity,
            GROUP=storage.group_size,
            NUM_GROUPS=storage.num_groups,
            BLOCK=block,
        )
        return evicted.view(torch.bool), evicted_keys, evicted_scores

    def _lookup(
        self, storage: TableStorage, keys: torch.Tensor, update: ScoreUpdate | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        slots, found = self._launch_lookup(storage, keys, update, None)
        return slots, found.view(torch.bool)

    def _upsert(
        self, storage: TableStorage, keys: torch.Tensor, update: ScoreUpdate, epoch: int, evict: bool
    ) -> InsertResult:
        if update.accumulate or update.values is not None:
            unique, inverse, per_key = _reduce_duplicates(keys, update)
            result = self._upsert_launches(storage, unique, per_key, epoch, evict)
            return InsertResult(
                result.slots[inverse],
                result.existed[inverse],
                result.evicted_keys,
                result.evicted_slots,
                result.evicted_scores,
            )
        return self._upsert_launches(storage, keys, update, epoch, evict)

    def _upsert_launches(
        self, storage: TableStorage, keys: torch.Tensor, update: ScoreUpdate, epoch: int, evict: bool
    ) -> InsertResult:
        slots, found = self._launch_lookup(storage, keys, update, epoch)
        evicted, evicted_keys, evicted_scores = self._launch_insert(storage, keys, found, slots, update, epoch, evict)
        lanes = evicted.nonzero().squeeze(1)
        return InsertResult(slots, found.view(torch.bool), evicted_keys[lanes], slots[lanes], evicted_scores[lanes])

    def _place_unique(self, storage: TableStorage, keys: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if keys.numel() == 0:
            return torch.zeros(0, dtype=torch.int64, device=keys.device)
        found = torch.zeros(keys.numel(), dtype=torch.int8, device=keys.device)
        slots = torch.full((keys.numel(),), -1, dtype=torch.int64, device=keys.device)
        self._launch_insert(storage, keys, found, slots, ScoreUpdate(values=scores), 0, evict=False)
        return slots
