"""The table in vectorized torch ops: runs on any device, the CPU backend of choice.

Loops run over probe groups and over insertion rounds, never over keys. A batch is deduplicated
first (``torch.unique``), so each distinct key is placed once; keys competing for one slot in a
round are settled by score (highest first, then batch order) and the losers try again next round.
"""

from __future__ import annotations

import torch

from dynamicemb.table.base import InsertResult
from dynamicemb.table.bucketed import BucketedHashTable, ScoreUpdate
from dynamicemb.table.layout import (
    EMPTY,
    FIRST_DIGEST,
    TOMBSTONE,
    TableStorage,
    digest_of_hash,
    hash_keys,
)

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


def _lowest_evictable(
    storage: TableStorage, buckets: torch.Tensor, epoch: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per bucket ``[R]``: (has an evictable entry, its slot, its score) for the lowest score among
    entries not touched by the current call (ties: the lowest slot)."""
    slots = buckets[:, None] * storage.bucket_capacity + torch.arange(storage.bucket_capacity, device=buckets.device)
    evictable = (storage.digests[slots] >= FIRST_DIGEST) & (storage.epochs[slots] != epoch)
    scores = storage.scores[slots].masked_fill(~evictable, _INT64_MAX)
    column = scores.argmin(1, keepdim=True)
    has = evictable.gather(1, column).squeeze(1)
    return has, slots.gather(1, column).squeeze(1), scores.gather(1, column).squeeze(1)


def _winners(targets: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Among rows sharing a target slot, the one with the highest score (then the first row): ``[R]`` bool."""
    by_score = torch.sort(scores, descending=True, stable=True).indices
    order = by_score[torch.sort(targets[by_score], stable=True).indices]
    sorted_targets = targets[order]
    first = torch.ones_like(sorted_targets, dtype=torch.bool)
    first[1:] = sorted_targets[1:] != sorted_targets[:-1]
    winners = torch.zeros_like(first)
    winners[order[first]] = True
    return winners


def place_absent_keys(
    storage: TableStorage,
    probe: _Probe,
    scores: torch.Tensor,
    first_free: torch.Tensor,
    epoch: int,
    evict: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Insert distinct absent keys ``[M]`` in rounds.

    Returns ``(slots [M] (-1 refused), evicted_keys [E], evicted_slots [E], evicted_scores [E])``.
    """
    device = probe.keys.device
    out = torch.full((probe.keys.numel(),), -1, dtype=torch.int64, device=device)
    evicted: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    pending = torch.arange(probe.keys.numel(), device=device)
    targets = first_free.clone()
    while pending.numel():
        accepted = targets >= 0
        full = (~accepted).nonzero().squeeze(1)
        if evict and full.numel():
            has, victim, victim_score = _lowest_evictable(storage, probe.bucket[pending[full]], epoch)
            ok = has & (scores[pending[full]] >= victim_score)
            targets[full[ok]] = victim[ok]
            accepted[full[ok]] = True
        rows = accepted.nonzero().squeeze(1)
        keys_rows = pending[rows]
        won = _winners(targets[rows], scores[keys_rows])
        win_rows, win_slots = keys_rows[won], targets[rows[won]]
        replaced = storage.digests[win_slots] >= FIRST_DIGEST
        if bool(replaced.any()):
            lost = win_slots[replaced]
            evicted.append((storage.keys[lost], lost, storage.scores[lost]))
        storage.size += int((~replaced).sum().item())
        storage.keys[win_slots] = probe.keys[win_rows]
        storage.scores[win_slots] = scores[win_rows]
        storage.digests[win_slots] = probe.digest[win_rows]
        storage.epochs[win_slots] = epoch
        out[win_rows] = win_slots
        pending = keys_rows[~won]
        targets = _first_free(storage, probe.select(pending))
    if evicted:
        ev_keys, ev_slots, ev_scores = (torch.cat(parts) for parts in zip(*evicted))
    else:
        ev_keys = ev_slots = ev_scores = torch.zeros(0, dtype=torch.int64, device=device)
    return out, ev_keys, ev_slots, ev_scores


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
        missing = (~found).nonzero().squeeze(1)
        placed, ev_keys, ev_slots, ev_scores = place_absent_keys(
            storage, probe.select(missing), scores[missing], first_free[missing], epoch, evict
        )
        slots[missing] = placed
        return InsertResult(slots[inverse], found[inverse], ev_keys, ev_slots, ev_scores)

    def _place_unique(self, storage: TableStorage, keys: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probe = _Probe(storage, keys)
        slots, *_ = place_absent_keys(storage, probe, scores, _first_free(storage, probe), 0, evict=False)
        return slots
