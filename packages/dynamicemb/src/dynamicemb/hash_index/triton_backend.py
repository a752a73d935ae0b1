"""The table on Triton kernels: the GPU backend (on CPU only under ``TRITON_INTERPRET=1``, for tests).

``find_or_insert`` is one kernel that finds each key (refreshing the scores of present keys and
marking their slots with the call's epoch) and inserts the rest into free slots, lock-free (see
:mod:`dynamicemb.hash_index.triton_kernels`); keys whose bucket is full are counted per bucket by that
kernel, grouped by bucket on the device without a sort and placed over low-score entries, each bucket
by one program (:mod:`dynamicemb.hash_index.triton_grouped_eviction`). With one score for the whole
call (TIMESTAMP, STEP, NO_EVICTION) batches are not deduplicated up front: duplicate keys meet in the
table itself or in the eviction program of their bucket. Per-key scores (LFU counts, caller scores)
are first reduced over duplicates with ``torch.unique`` (one synchronization, for its size) unless the
caller passes ``unique_keys=True``; their contenders are ranked inside each bucket by the eviction
kernel. Launches of a call that may evict: one zeroing, the find-or-insert kernel, a ``cumsum``, the
placing kernel and the eviction kernel; no host synchronization: the evicted entries are compacted
(one synchronization) only when the caller reads them. The Triton kernels are launched through
:class:`dynamicemb.triton_launch.BoundKernel`, which skips Triton's per-call argument binding after the
first launch of each variant.

Deterministic mode (:mod:`dynamicemb.deterministic`): the kernels' insertion races (which key takes a
contended free slot, which is deferred and possibly refused) make slots and, with per-key scores, the
refused keys depend on thread scheduling; in that mode insertions and rehashes run the torch
backend's ordered placement on the same storage, and lookups stay on the kernels (their only writes
are scores and epochs of found keys: equal values, or integer additions).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dynamicemb.deterministic import is_deterministic
from dynamicemb.hash_index.base import DynamicEmbScoreStrategy, Evicted, InsertResult
from dynamicemb.hash_index.bucketed import BucketedHashTable, ScoreUpdate
from dynamicemb.hash_index.layout import TableStorage
from dynamicemb.hash_index.torch_backend import ordered_place_unique, ordered_upsert
from dynamicemb.hash_index.triton_grouped_eviction import (
    evict_grouped_kernel,
    evict_ranked_kernel,
    place_deferred_kernel,
)
from dynamicemb.hash_index.triton_kernels import (
    SCORE_ADD,
    SCORE_NONE,
    SCORE_PER_KEY,
    SCORE_VALUE,
    find_or_insert_kernel,
    lookup_kernel,
)
from dynamicemb.masks import positions
from dynamicemb.triton_launch import INTERPRETED, BoundKernel, num_programs

# The kernels launched without Triton's per-call argument binding after each variant's first launch.
_LOOKUP = BoundKernel(lookup_kernel)
_FIND_OR_INSERT = BoundKernel(find_or_insert_kernel)
_PLACE_DEFERRED = BoundKernel(place_deferred_kernel)
_EVICT_GROUPED = BoundKernel(evict_grouped_kernel)
_EVICT_RANKED = BoundKernel(evict_ranked_kernel)


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


# The find-or-insert kernel needs BLOCK >= 32 * num_warps (see triton_kernels).
_INSERT_WARPS = 4
# One eviction program per bucket makes successive reductions over the bucket's slots: a single warp
# reduces with shuffles alone (no shared memory, no barriers) and leaves room for more programs per SM.
_EVICT_WARPS = 1
# Lanes per program of the counting-sort kernels (per-lane atomics need BLOCK >= the program's threads).
_GROUPING_BLOCK = 1024


@dataclass(frozen=True)
class _DeferredBuckets:
    """What the find-or-insert kernel lists for the grouped eviction: ``counts [num_buckets] int32``
    (deferred lanes per bucket), ``segment_buckets [min(N, num_buckets)] int32`` (the buckets with
    some, in any order; the first ``num_segments`` are set) and ``num_segments [1] int64``."""

    counts: torch.Tensor
    segment_buckets: torch.Tensor
    num_segments: torch.Tensor

    @staticmethod
    def allocate(storage: TableStorage, keys: torch.Tensor) -> _DeferredBuckets:
        n, device = keys.numel(), keys.device
        if n >= 2**31:
            raise ValueError(f"at most 2**31 - 1 keys per call, got {n}")
        # One zeroed buffer (one launch): num_segments in its first 16 bytes, the counts after them
        # (both 16-byte aligned, as the kernels compiled at creation expect).
        zeroed = torch.zeros(4 + storage.num_buckets, dtype=torch.int32, device=device)
        return _DeferredBuckets(
            zeroed[4:],
            torch.empty(min(n, storage.num_buckets), dtype=torch.int32, device=device),
            zeroed[:2].view(torch.int64),
        )

    @staticmethod
    def placeholder(keys: torch.Tensor) -> _DeferredBuckets:
        """Stand-ins for the kernel's unused pointers (never read or written)."""
        return _DeferredBuckets(keys, keys, keys)


@functools.cache
def _eviction_programs(device: torch.device) -> int:
    """Programs of an eviction launch (each loops over listed buckets): as many one-warp programs as
    the GPU keeps resident (32 per SM); two under the interpreter, which pays per program instance."""
    if not compiles_kernels(device):
        return 2
    return 32 * torch.cuda.get_device_properties(device).multi_processor_count


def _block_size(device: torch.device) -> int:
    # The interpreter pays per program instance, so it gets few large programs.
    return 256 if device.type == "cpu" or INTERPRETED else 32 * _INSERT_WARPS


def compiles_kernels(device: torch.device) -> bool:
    """Whether launches on ``device`` compile GPU code (CUDA, not the ``TRITON_INTERPRET=1`` interpreter)."""
    return device.type == "cuda" and not INTERPRETED


# (device, bucket capacity, score strategy) of the tables whose kernels ``warm_up`` has compiled.
_WARMED_UP: set[tuple[torch.device, int, DynamicEmbScoreStrategy]] = set()


class TritonHashTable(BucketedHashTable):
    """:class:`BucketedHashTable` on Triton kernels.

    ``warm_up`` (default on): the constructor compiles every kernel variant the table will launch
    (:meth:`warm_up`), so the first full bucket does not stall training on a Triton compilation.
    """

    def __init__(self, *, warm_up: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if warm_up:
            self.warm_up()

    def warm_up(self) -> bool:
        """Compile the lookup, insertion, eviction and rehash kernels this table launches, by running
        them on a scratch table of two buckets with the same bucket capacity and score strategy
        (:func:`exercise_kernels`). Once per process and configuration; nothing on the CPU or under
        ``TRITON_INTERPRET=1``. Returns whether kernels were launched."""
        config = (self.device, self.bucket_capacity, self.score_strategy)
        if not compiles_kernels(self.device) or config in _WARMED_UP:
            return False
        exercise_kernels(self.device, self.bucket_capacity, self.score_strategy)
        _WARMED_UP.add(config)
        return True

    def _launch_lookup(
        self, storage: TableStorage, keys: torch.Tensor, update: ScoreUpdate | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slots [N], found [N] bool)``; applies ``update`` to the found keys' scores."""
        n = keys.numel()
        slots = torch.empty(n, dtype=torch.int64, device=keys.device)
        found = torch.empty(n, dtype=torch.int8, device=keys.device)
        mode, per_key, value = _score_args(update, keys)
        block = _block_size(keys.device)
        _LOOKUP(
            num_programs(n, block),
            keys,
            n,
            storage.keys,
            storage.digests,
            storage.scores,
            slots,
            found,
            storage.num_buckets,
            per_key,
            value,
            SCORE_MODE=mode,
            BUCKET=storage.bucket_capacity,
            GROUP=storage.group_size,
            NUM_GROUPS=storage.num_groups,
            BLOCK=block,
        )
        return slots, found.view(torch.bool)

    def _launch_find_or_insert(
        self,
        storage: TableStorage,
        keys: torch.Tensor,
        update: ScoreUpdate,
        epoch: int,
        defer_full: bool,
        deferred: _DeferredBuckets | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slots [N], existed [N] bool)`` of one find-or-insert launch: free slots only; full
        buckets give ``DEFERRED`` (``defer_full``) or -1. With ``deferred`` (and ``defer_full``) the
        deferred lanes are also counted per bucket."""
        n = keys.numel()
        slots = torch.empty(n, dtype=torch.int64, device=keys.device)
        existed = torch.empty(n, dtype=torch.int8, device=keys.device)
        lists = deferred if deferred is not None else _DeferredBuckets.placeholder(keys)
        mode, per_key, value = _score_args(update, keys)
        block = _block_size(keys.device)
        _FIND_OR_INSERT(
            num_programs(n, block),
            keys,
            n,
            existed,
            slots,
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
            lists.counts,
            lists.segment_buckets,
            lists.num_segments,
            SCORE_MODE=mode,
            DEFER_FULL=defer_full,
            LIST_DEFERRED=deferred is not None,
            BUCKET=storage.bucket_capacity,
            GROUP=storage.group_size,
            NUM_GROUPS=storage.num_groups,
            BLOCK=block,
            num_warps=_INSERT_WARPS,
        )
        return slots, existed.view(torch.bool)

    def _evict_grouped(
        self,
        storage: TableStorage,
        keys: torch.Tensor,
        slots: torch.Tensor,
        deferred: _DeferredBuckets,
        update: ScoreUpdate,
        epoch: int,
    ) -> Callable[[], Evicted]:
        """Places the lanes the insertion deferred and listed in ``deferred``, grouped on the device
        by a counting sort (see :mod:`dynamicemb.hash_index.triton_grouped_eviction`): with one score
        for the call (keys may repeat) by ``evict_grouped_kernel``, with per-key scores
        (``update.values``, distinct keys) by ``evict_ranked_kernel``. Returns the function that
        compacts the evicted ``(keys, slots, scores)``. No host synchronization: the eviction launches a
        fixed number of programs that loop over the listed buckets (none when nothing was deferred,
        the common case below load factor 1, and the programs return at once). The compaction, run
        only when the caller reads the evicted entries, waits once."""
        n, device = keys.numel(), keys.device
        starts = torch.cumsum(deferred.counts, 0, dtype=torch.int32)  # ends; place_deferred_kernel makes them starts
        grouped_lanes = torch.empty(n, dtype=torch.int32, device=device)
        grouped_keys = torch.empty_like(keys)
        _PLACE_DEFERRED(
            num_programs(n, _GROUPING_BLOCK),
            keys,
            slots,
            n,
            starts,
            grouped_lanes,
            grouped_keys,
            storage.num_buckets,
            NUM_GROUPS=storage.num_groups,
            BLOCK=_GROUPING_BLOCK,
        )
        # Flags are written for every grouped position below the number of deferred lanes, the only
        # ones the compaction reads: no zeroing launch.
        flags = torch.empty(n, dtype=torch.int8, device=device)
        # keys, slots, scores; rows of an even length keep every row 16-byte aligned, so the kernel
        # compiled at creation (aligned pointers) serves every call.
        evicted = torch.empty(3, n + (n & 1), dtype=torch.int64, device=device)
        programs = min(deferred.segment_buckets.numel(), _eviction_programs(device))
        grouping = (
            deferred.segment_buckets,
            deferred.num_segments,
            deferred.counts,
            starts,
            grouped_lanes,
            grouped_keys,
        )
        outputs = (slots, flags, evicted[0], evicted[1], evicted[2])
        table = (storage.keys, storage.digests, storage.scores, storage.epochs, storage.num_buckets)
        shape = dict(BUCKET=storage.bucket_capacity, NUM_GROUPS=storage.num_groups, CHUNK=16, num_warps=_EVICT_WARPS)
        if update.values is None:
            _EVICT_GROUPED(programs, *grouping, *outputs, *table, update.value, epoch, **shape)
        else:
            _EVICT_RANKED(programs, *grouping, update.values, *outputs, *table, epoch, **shape)
        counts = deferred.counts

        def compact() -> Evicted:
            total = int(counts.sum())  # deferred lanes: the grouped positions the eviction wrote
            taken = evicted[:, positions(flags[:total])]
            return taken[0], taken[1], taken[2]

        return compact

    def _lookup(
        self, storage: TableStorage, keys: torch.Tensor, update: ScoreUpdate | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._launch_lookup(storage, keys, update)

    def _upsert(
        self, storage: TableStorage, keys: torch.Tensor, update: ScoreUpdate, epoch: int, evict: bool
    ) -> InsertResult:
        if is_deterministic(self.deterministic):
            return ordered_upsert(storage, keys, update, epoch, evict)
        if update.distinct and update.accumulate and update.values is None:
            # Distinct keys: each occurs once, so its LFU increment (and a new key's count) is 1.
            return self._upsert_launches(
                storage, keys, ScoreUpdate(accumulate=True, values=torch.ones_like(keys)), epoch, evict
            )
        if update.distinct:
            return self._upsert_launches(storage, keys, update, epoch, evict)
        if update.accumulate or update.values is not None:
            unique, inverse, per_key = _reduce_duplicates(keys, update)
            result = self._upsert_launches(storage, unique, per_key, epoch, evict)
            return InsertResult(result.slots[inverse], result.existed[inverse], evicted=result.evicted)
        return self._upsert_launches(storage, keys, update, epoch, evict)

    def _upsert_launches(
        self, storage: TableStorage, keys: torch.Tensor, update: ScoreUpdate, epoch: int, evict: bool
    ) -> InsertResult:
        assert not update.accumulate or update.values is not None, "LFU counts are reduced per key first"
        deferred = _DeferredBuckets.allocate(storage, keys) if evict else None
        slots, existed = self._launch_find_or_insert(storage, keys, update, epoch, evict, deferred)
        if deferred is not None:
            compact = self._evict_grouped(storage, keys, slots, deferred, update, epoch)
            return InsertResult(slots, existed, evicted=compact)
        empty = torch.zeros(0, dtype=torch.int64, device=keys.device)
        return InsertResult(slots, existed, empty, empty, empty)

    def _place_unique(self, storage: TableStorage, keys: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if is_deterministic(self.deterministic):
            return ordered_place_unique(storage, keys, scores)
        if keys.numel() == 0:
            return torch.zeros(0, dtype=torch.int64, device=keys.device)
        # Epoch 0, which a fresh table's slots hold: the keys are distinct and absent, so no lane
        # meets a key that another lane did not insert in this call.
        return self._launch_find_or_insert(storage, keys, ScoreUpdate(values=scores), 0, defer_full=False)[0]


def exercise_kernels(device: torch.device, bucket_capacity: int, strategy: DynamicEmbScoreStrategy) -> None:
    """Launch every kernel variant a table of this bucket capacity and score strategy uses: lookups
    (plain and score-updating), insertions that fill both buckets of a scratch table and evict
    (one score for the call and per-key scores), and a rehash; the scalar scores once below and
    once above ``2**31`` (Triton types them i32 or i64). The scratch table is dropped afterwards."""
    keys = torch.arange(4 * bucket_capacity, dtype=torch.int64, device=device)  # 2x the scratch slots
    for scalar in (1, 2**40):
        scratch = TritonHashTable(
            init_capacity=2 * bucket_capacity,
            max_capacity=4 * bucket_capacity,
            bucket_capacity=bucket_capacity,
            score_strategy=strategy,
            device=device,
            warm_up=False,
        )
        scratch._clock = scratch._step = scalar
        scratch.find(keys, update_score=True)
        if strategy == DynamicEmbScoreStrategy.NO_EVICTION:
            few = keys[:2]  # at most two keys per bucket: no bucket overflows
            scratch.find_or_insert(few)
            scratch.find_or_insert(few + 2, torch.full_like(few, scalar))
        else:
            if strategy != DynamicEmbScoreStrategy.CUSTOMIZED:
                scratch.find_or_insert(keys)
            scratch.find_or_insert(keys + keys.numel(), torch.full_like(keys, scalar))
        scratch.find(keys)
        scratch.reserve(scratch.capacity)  # doubles: the rehash's insertion
    if device.type == "cuda":
        torch.cuda.synchronize(device)
