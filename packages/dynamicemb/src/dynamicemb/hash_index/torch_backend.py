"""The table in vectorized torch ops: runs on any device, the CPU backend of choice.

Loops run over probe groups and over insertion rounds, never over keys. A batch is deduplicated
first (``torch.unique``), so each distinct key is placed once; keys competing for one slot in a
round are settled by score (highest first, then batch order) and the losers try again next round.
"""

from __future__ import annotations

import torch

from dynamicemb.hash_index.base import InsertResult
from dynamicemb.hash_index.bucketed import BucketedHashTable, ScoreUpdate
from dynamicemb.hash_index.layout import (
    EMPTY,
    FIRST_DIGEST,
    TOMBSTONE,
    TableStorage,
    digest_of_hash,
    hash_keys,
)
from dynamicemb.masks import positions

_INT64_MAX = torch.iinfo(torch.int64).max
_INT64_MIN = torch.iinfo(torch.int64).min


class _Probe:
    """Hash-derived coordinates of a batch of keys in one storage."""

    def __init__(self, storage: TableStorage, keys: torch.Tensor) -> None:
        h = hash_keys(keys)
        self.keys = keys
        self.bucket, self.group = storage.bucket_and_group(h)
        self.digest = digest_of_hash(h)

    def select(self, index: torch.Tensor) -> _Probe:
        sub = _Probe.__new__(_Probe)
        sub.keys, sub.bucket = self.keys[index], self.bucket[index]
        sub.group, sub.digest = self.group[index], self.digest[index]
        return sub


def _group_rows(storage: TableStorage, probe: _Probe, rows: torch.Tensor, round_: int) -> torch.Tensor:
    """Index ``[R]`` of the ``round_``-th probed group of the keys ``rows``, in groups of ``G`` slots."""
    group = (probe.group[rows] + round_) & (storage.num_groups - 1)
    return probe.bucket[rows] * storage.num_groups + group


def _group_digests(storage: TableStorage, groups: torch.Tensor) -> torch.Tensor:
    """Digests ``[R, G]`` of the groups ``[R]`` (a row gather, much cheaper than per-slot indexing)."""
    return storage.digests.view(-1, storage.group_size).index_select(0, groups)


def _first_true(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``mask [R, G]``: whether any column is set, and the first set column."""
    return mask.any(1), mask.to(torch.uint8).argmax(1)


def probe_keys(storage: TableStorage, probe: _Probe) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slot [N], first_free [N])``: the key's slot or -1, and the first free slot of its probe
    sequence or -1 (computed for keys that are absent)."""
    n = probe.keys.numel()
    device = probe.keys.device
    width = storage.group_size
    slot = torch.full((n,), -1, dtype=torch.int64, device=device)
    first_free = torch.full((n,), -1, dtype=torch.int64, device=device)
    active = torch.arange(n, device=device)
    for round_ in range(storage.num_groups):
        if active.numel() == 0:
            break
        groups = _group_rows(storage, probe, active, round_)
        digests = _group_digests(storage, groups)
        rows, cols = (digests == probe.digest[active][:, None]).nonzero(as_tuple=True)
        if rows.numel():
            candidates = groups[rows] * width + cols
            hit = storage.keys[candidates] == probe.keys[active[rows]]
            slot[active[rows[hit]]] = candidates[hit]
        has_free, free_col = _first_true(digests <= TOMBSTONE)
        unset = has_free & (first_free[active] < 0)
        first_free[active[unset]] = groups[unset] * width + free_col[unset]
        keep = (slot[active] < 0) & ~(digests == EMPTY).any(1)
        active = active[keep]
    return slot, first_free


def _first_free(storage: TableStorage, probe: _Probe) -> torch.Tensor:
    """First free slot ``[N]`` (-1 if the bucket has none) in each key's probe order."""
    n = probe.keys.numel()
    first_free = torch.full((n,), -1, dtype=torch.int64, device=probe.keys.device)
    active = torch.arange(n, device=probe.keys.device)
    for round_ in range(storage.num_groups):
        if active.numel() == 0:
            break
        groups = _group_rows(storage, probe, active, round_)
        has_free, free_col = _first_true(_group_digests(storage, groups) <= TOMBSTONE)
        first_free[active[has_free]] = groups[has_free] * storage.group_size + free_col[has_free]
        active = active[~has_free]
    return first_free


def _winners(targets: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Among rows sharing a target slot, the one with the highest score (then the first row): ``[R]`` bool."""
    order = _group_by_descending_score(targets, scores)
    sorted_targets = targets[order]
    first = torch.ones_like(sorted_targets, dtype=torch.bool)
    first[1:] = sorted_targets[1:] != sorted_targets[:-1]
    winners = torch.zeros_like(first)
    winners[order[first]] = True
    return winners


def _group_by_descending_score(groups: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Permutation sorting rows by group, then by descending score, then by row."""
    by_score = torch.sort(scores, descending=True, stable=True).indices
    return by_score[torch.sort(groups[by_score], stable=True).indices]


def _write(
    storage: TableStorage, probe: _Probe, rows: torch.Tensor, slots: torch.Tensor, scores: torch.Tensor, epoch: int
) -> None:
    storage.keys[slots] = probe.keys[rows]
    storage.scores[slots] = scores[rows]
    storage.digests[slots] = probe.digest[rows]
    storage.epochs[slots] = epoch


def _fill_free_slots(
    storage: TableStorage, probe: _Probe, scores: torch.Tensor, first_free: torch.Tensor, epoch: int, out: torch.Tensor
) -> torch.Tensor:
    """Place keys at the first free slot of their probe sequence, in rounds (one winner per slot per
    round, by score); returns the rows whose bucket ran out of free slots."""
    pending = torch.arange(probe.keys.numel(), device=probe.keys.device)
    targets = first_free
    without_room = [pending[:0]]
    while pending.numel():
        has_room = targets >= 0
        without_room.append(pending[~has_room])
        pending, targets = pending[has_room], targets[has_room]
        won = _winners(targets, scores[pending])
        _write(storage, probe, pending[won], targets[won], scores, epoch)
        storage.size += int(won.sum().item())
        out[pending[won]] = targets[won]
        pending = pending[~won]
        targets = _first_free(storage, probe.select(pending))
    return torch.cat(without_room)


def _evict_for(
    storage: TableStorage, probe: _Probe, scores: torch.Tensor, rows: torch.Tensor, epoch: int, out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place the keys ``rows`` (whose buckets are full) over the lowest-score entries not touched by
    this call: per bucket, the k-th highest new score against the k-th lowest entry, refused where
    lower. Returns the evicted ``(keys, slots, scores)``."""
    width = storage.bucket_capacity
    buckets, which = torch.unique(probe.bucket[rows], return_inverse=True)
    digests = storage.digests.view(-1, width).index_select(0, buckets)
    touched = storage.epochs.view(-1, width).index_select(0, buckets) == epoch
    evictable = (digests >= FIRST_DIGEST) & ~touched
    held = storage.scores.view(-1, width).index_select(0, buckets).masked_fill(~evictable, _INT64_MAX)
    counts = torch.bincount(which, minlength=buckets.numel())
    most = min(int(counts.max().item()), width)
    # Ascending (score, column): a stable sort settles equal scores by column on every device.
    victim_scores, victim_cols = (part[:, :most] for part in torch.sort(held, dim=1, stable=True))
    order = _group_by_descending_score(which, scores[rows])
    rows, which = rows[order], which[order]
    rank = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[which]
    column = rank.clamp(max=most - 1)
    ok = rank < evictable.sum(1)[which]
    ok &= scores[rows] >= victim_scores[which, column]
    rows = rows[ok]
    slots = buckets[which[ok]] * width + victim_cols[which[ok], column[ok]]
    evicted = (storage.keys[slots], slots, storage.scores[slots])
    _write(storage, probe, rows, slots, scores, epoch)
    out[rows] = slots
    return evicted


def place_absent_keys(
    storage: TableStorage,
    probe: _Probe,
    scores: torch.Tensor,
    first_free: torch.Tensor,
    epoch: int,
    evict: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Insert distinct absent keys ``[M]``: free slots first, then (``evict``) over low-score entries.

    Returns ``(slots [M] (-1 refused), evicted_keys [E], evicted_slots [E], evicted_scores [E])``.
    """
    out = torch.full((probe.keys.numel(),), -1, dtype=torch.int64, device=probe.keys.device)
    without_room = _fill_free_slots(storage, probe, scores, first_free, epoch, out)
    if evict and without_room.numel():
        return (out, *_evict_for(storage, probe, scores, without_room, epoch, out))
    empty = torch.zeros(0, dtype=torch.int64, device=probe.keys.device)
    return out, empty, empty, empty


def ordered_upsert(
    storage: TableStorage, keys: torch.Tensor, update: ScoreUpdate, epoch: int, evict: bool
) -> InsertResult:
    """Find or insert ``keys [N]`` in ``storage`` by ordered torch ops: the keys are deduplicated and
    sorted (``torch.unique``), and contenders for a slot are settled by score then key, so the result
    depends only on the table and the set of keys (the torch backend, and the deterministic mode of
    the Triton one)."""
    unique, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    if update.accumulate:
        scores = counts
    elif update.values is not None:
        scores = torch.full_like(unique, _INT64_MIN).scatter_reduce(0, inverse, update.values, "amax")
    else:
        scores = torch.full_like(unique, update.value)
    probe = _Probe(storage, unique)
    slots, first_free = probe_keys(storage, probe)
    found = slots >= 0
    hit = slots[found]
    if update.accumulate:
        storage.scores[hit] += scores[found]
    else:
        storage.scores[hit] = scores[found]
    storage.epochs[hit] = epoch
    missing = positions(~found)
    placed, ev_keys, ev_slots, ev_scores = place_absent_keys(
        storage, probe.select(missing), scores[missing], first_free[missing], epoch, evict
    )
    slots[missing] = placed
    return InsertResult(slots[inverse], found[inverse], ev_keys, ev_slots, ev_scores)


def ordered_place_unique(storage: TableStorage, keys: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Insert distinct absent ``keys [M]`` with ``scores [M]`` without eviction: ``[M]`` slots (-1: no room)."""
    probe = _Probe(storage, keys)
    slots, *_ = place_absent_keys(storage, probe, scores, _first_free(storage, probe), 0, evict=False)
    return slots


class TorchHashTable(BucketedHashTable):
    """:class:`BucketedHashTable` in vectorized torch ops (CPU or CUDA tensors)."""

    def _lookup(
        self, storage: TableStorage, keys: torch.Tensor, update: ScoreUpdate | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        slots, _ = probe_keys(storage, _Probe(storage, keys))
        found = slots >= 0
        if update is not None:
            hit = slots[found]
            if update.accumulate:
                storage.scores.index_add_(0, hit, torch.ones_like(hit))
            else:
                storage.scores[hit] = update.value
        return slots, found

    def _upsert(
        self, storage: TableStorage, keys: torch.Tensor, update: ScoreUpdate, epoch: int, evict: bool
    ) -> InsertResult:
        return ordered_upsert(storage, keys, update, epoch, evict)

    def _place_unique(self, storage: TableStorage, keys: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return ordered_place_unique(storage, keys, scores)
