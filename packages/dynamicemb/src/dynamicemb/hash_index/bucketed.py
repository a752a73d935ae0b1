"""Backend-independent part of the bucketed table: validation, score rules, growth, erase, export.

A backend supplies three operations on a :class:`~dynamicemb.hash_index.layout.TableStorage`:
``_lookup`` (find, optionally updating scores), ``_upsert`` (find or insert, with eviction) and
``_place_unique`` (insert distinct absent keys with given scores, used when rehashing).
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from dataclasses import dataclass

import torch

from dynamicemb.hash_index.base import DynamicEmbScoreStrategy, InsertResult, ScoredHashTable, SlotRemap
from dynamicemb.hash_index.layout import (
    FIRST_DIGEST,
    TOMBSTONE,
    TableStorage,
    check_bucket_capacity,
    num_buckets_for,
)
from dynamicemb.masks import positions

_EPOCH_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class ScoreUpdate:
    """How one call sets the scores of the keys it touches.

    ``accumulate``: LFU, each occurrence of a key adds 1 (a new key starts at its count); a backend
    that has reduced duplicates itself passes the per-key counts as ``values``. ``distinct``: the
    caller guarantees distinct keys (``unique_keys=True``), so a backend may skip the reduction. Otherwise the score
    is assigned: ``values [N]`` per occurrence when given (a key occurring several times gets the
    largest), else the scalar ``value``.
    """

    accumulate: bool = False
    values: torch.Tensor | None = None
    value: int = 0
    distinct: bool = False  # the caller guarantees the keys of the call are distinct


class BucketedHashTable(ScoredHashTable):
    """A :class:`ScoredHashTable` over the layout of :mod:`dynamicemb.hash_index.layout`.

    Capacities are rounded up to a power-of-two number of buckets of ``bucket_capacity`` slots
    (a power of two >= 4): ``capacity`` may exceed ``init_capacity`` and the table may grow to the
    rounded ``max_capacity``.

    Scores. ``find_or_insert`` / ``insert_or_assign`` take ``scores [N] int64``: required for
    CUSTOMIZED, and with any other strategy they override it for this call (used to restore
    dumped scores). Without them: TIMESTAMP and NO_EVICTION use a clock that advances once per
    score-setting call (``find(update_score=True)``, ``find_or_insert``, ``insert_or_assign``);
    STEP uses the value of :meth:`set_step`; LFU adds the number of occurrences in the batch.
    ``find(update_score=True)`` leaves CUSTOMIZED scores unchanged.

    Eviction. A new key goes to the first free slot of its bucket in probe order. The new keys of a
    call that find their bucket full then take, highest score first, the entries of that bucket the
    call has not touched (found or inserted), lowest score first; a key whose score is lower than
    the entry it would replace is refused (slot ``-1``), so a key lower than every entry is always
    refused. Which of several new keys gets a contended free slot, and ties between equal scores,
    may differ between backends. NO_EVICTION never evicts: a key that finds no free slot raises
    ``RuntimeError`` naming the capacity (call :meth:`reserve` first).

    ``deterministic``: ``True`` makes every backend place keys in an order that depends only on the
    table and the set of keys of the call (see :mod:`dynamicemb.deterministic`); ``None`` follows
    ``torch.are_deterministic_algorithms_enabled()`` at each call. The torch backend always does.
    """

    def __init__(
        self,
        *,
        init_capacity: int,
        max_capacity: int,
        bucket_capacity: int = 128,
        max_load_factor: float = 0.5,
        score_strategy: DynamicEmbScoreStrategy = DynamicEmbScoreStrategy.TIMESTAMP,
        device: torch.device | str | None = None,
        deterministic: bool | None = None,
    ) -> None:
        check_bucket_capacity(bucket_capacity)
        if init_capacity <= 0:
            raise ValueError(f"init_capacity must be positive, got {init_capacity}")
        if max_capacity < init_capacity:
            raise ValueError(f"max_capacity ({max_capacity}) must be >= init_capacity ({init_capacity})")
        if not 0.0 < max_load_factor <= 1.0:
            raise ValueError(f"max_load_factor must be in (0, 1], got {max_load_factor}")
        self.device = _normalize_device(device)
        self.bucket_capacity = bucket_capacity
        self.max_capacity = num_buckets_for(max_capacity, bucket_capacity) * bucket_capacity
        self.max_load_factor = max_load_factor
        self.score_strategy = DynamicEmbScoreStrategy(score_strategy)
        self._storage = TableStorage.allocate(
            num_buckets_for(init_capacity, bucket_capacity), bucket_capacity, self.device
        )
        self.deterministic = deterministic
        self._clock = 0
        self._step = 0
        self._epoch = 0

    # ----------------------------------------------------------------------------- backend hooks
    @abstractmethod
    def _lookup(
        self, storage: TableStorage, keys: torch.Tensor, update: ScoreUpdate | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys [N]`` -> ``(slots [N] int64, found [N] bool)``; applies ``update`` to found keys."""

    @abstractmethod
    def _upsert(
        self, storage: TableStorage, keys: torch.Tensor, update: ScoreUpdate, epoch: int, evict: bool
    ) -> InsertResult:
        """Find or insert ``keys [N]``, marking every touched slot with ``epoch``."""

    @abstractmethod
    def _place_unique(self, storage: TableStorage, keys: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Insert distinct keys absent from ``storage`` without eviction; ``[M]`` slots (-1: no room)."""

    # ------------------------------------------------------------------------------- properties
    @property
    def capacity(self) -> int:
        return self._storage.capacity

    @property
    def num_buckets(self) -> int:
        return self._storage.num_buckets

    def size(self) -> int:
        return int(self._storage.size.item())

    def set_step(self, step: int) -> None:
        self._step = int(step)

    # ------------------------------------------------------------------------------- operations
    def find(self, keys: torch.Tensor, update_score: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_keys(keys)
        update = self._lookup_update() if update_score else None
        if keys.numel() == 0:
            return _empty_slots(self.device), torch.zeros(0, dtype=torch.bool, device=self.device)
        return self._lookup(self._storage, keys, update)

    def find_or_insert(
        self, keys: torch.Tensor, scores: torch.Tensor | None = None, *, unique_keys: bool = False
    ) -> InsertResult:
        """Find each key, inserting the missing ones; see the class docstring for scores/eviction.
        ``unique_keys``: the caller guarantees distinct keys (the Triton backend then skips its
        ``torch.unique`` for per-key scores; duplicates with this flag may corrupt the table)."""
        self._check_keys(keys)
        update = dataclasses.replace(self._insert_update(keys, scores), distinct=unique_keys)
        epoch = self._next_epoch()
        if keys.numel() == 0:
            return _empty_result(self.device)
        evict = self.score_strategy != DynamicEmbScoreStrategy.NO_EVICTION
        result = self._upsert(self._storage, keys, update, epoch, evict)
        if not evict:
            refused = int(result.refused.sum().item())
            if refused:
                raise RuntimeError(
                    f"NO_EVICTION table is full: {refused} keys found no free slot in their bucket "
                    f"(capacity {self.capacity}, max_capacity {self.max_capacity}, size {self.size()}); "
                    "call reserve() before inserting or raise max_capacity"
                )
        return result

    def insert_or_assign(
        self, keys: torch.Tensor, scores: torch.Tensor | None = None, *, unique_keys: bool = False
    ) -> InsertResult:
        """The index holds no values, so this is :meth:`find_or_insert`: missing keys are inserted
        and present keys get their score set; the caller assigns values at the returned slots."""
        return self.find_or_insert(keys, scores, unique_keys=unique_keys)

    def scores_at(self, slots: torch.Tensor) -> torch.Tensor:
        if slots.dtype != torch.int64 or slots.dim() != 1:
            raise ValueError(f"slots must be a 1-D int64 tensor, got {slots.dtype} of shape {tuple(slots.shape)}")
        if bool(((slots < 0) | (slots >= self.capacity)).any()):
            raise ValueError(f"slots must be in [0, {self.capacity}) (missing keys have slot -1)")
        return self._storage.scores[slots.to(self.device)]

    def erase(self, keys: torch.Tensor) -> torch.Tensor:
        self._check_keys(keys)
        if keys.numel() == 0:
            return torch.zeros(0, dtype=torch.bool, device=self.device)
        slots, found = self._lookup(self._storage, keys, None)
        freed = torch.unique(slots[found])
        self._storage.digests[freed] = TOMBSTONE
        self._storage.size -= freed.numel()
        return found

    def export_batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if start < 0 or count < 0:
            raise ValueError(f"export_batch needs start >= 0 and count >= 0, got start={start}, count={count}")
        storage = self._storage
        end = min(start + count, storage.capacity)
        if start >= end:
            return _empty_slots(self.device), _empty_slots(self.device), _empty_slots(self.device)
        occupied = storage.digests[start:end] >= FIRST_DIGEST
        slots = positions(occupied) + start
        return storage.keys[slots], slots, storage.scores[slots]

    def reserve(self, num_new_keys: int) -> SlotRemap | None:
        if num_new_keys < 0:
            raise ValueError(f"num_new_keys must be >= 0, got {num_new_keys}")
        needed = self.size() + num_new_keys
        capacity = self.capacity
        while needed > self.max_load_factor * capacity and capacity < self.max_capacity:
            capacity *= 2
        if capacity == self.capacity:
            return None
        return self._rehash(capacity // self.bucket_capacity)

    # ---------------------------------------------------------------------------------- helpers
    def _rehash(self, num_buckets: int) -> SlotRemap:
        old = self._storage
        old_slots = positions(old.digests >= FIRST_DIGEST)
        new = TableStorage.allocate(num_buckets, self.bucket_capacity, self.device)
        new_slots = self._place_unique(new, old.keys[old_slots], old.scores[old_slots])
        if bool((new_slots < 0).any()):
            raise RuntimeError("rehash lost keys: a doubled table must hold every key of its source")
        self._storage = new
        return SlotRemap(old.capacity, new.capacity, old_slots, new_slots)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _next_epoch(self) -> int:
        if self._epoch == _EPOCH_LIMIT:
            self._storage.epochs.zero_()
            self._epoch = 0
        self._epoch += 1
        return self._epoch

    def _lookup_update(self) -> ScoreUpdate | None:
        strategy = self.score_strategy
        if strategy == DynamicEmbScoreStrategy.CUSTOMIZED:
            return None
        if strategy == DynamicEmbScoreStrategy.LFU:
            return ScoreUpdate(accumulate=True)
        if strategy == DynamicEmbScoreStrategy.STEP:
            return ScoreUpdate(value=self._step)
        return ScoreUpdate(value=self._tick())

    def _insert_update(self, keys: torch.Tensor, scores: torch.Tensor | None) -> ScoreUpdate:
        clock = self._tick()
        if scores is not None:
            self._check_scores(keys, scores)
            return ScoreUpdate(values=scores)
        strategy = self.score_strategy
        if strategy == DynamicEmbScoreStrategy.CUSTOMIZED:
            raise ValueError("score_strategy CUSTOMIZED needs scores: pass scores=[N] int64 tensor")
        if strategy == DynamicEmbScoreStrategy.LFU:
            return ScoreUpdate(accumulate=True)
        if strategy == DynamicEmbScoreStrategy.STEP:
            return ScoreUpdate(value=self._step)
        return ScoreUpdate(value=clock)

    def _check_keys(self, keys: torch.Tensor) -> None:
        if not isinstance(keys, torch.Tensor):
            raise TypeError(f"keys must be a torch.Tensor, got {type(keys).__name__}")
        if keys.dtype != torch.int64:
            raise TypeError(f"keys must be int64, got {keys.dtype}")
        if keys.dim() != 1:
            raise ValueError(f"keys must be 1-D, got shape {tuple(keys.shape)}")
        if keys.device != self.device:
            raise ValueError(f"keys are on {keys.device} but the table is on {self.device}")

    def _check_scores(self, keys: torch.Tensor, scores: torch.Tensor) -> None:
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
        if scores.dtype != torch.int64:
            raise TypeError(f"scores must be int64, got {scores.dtype}")
        if scores.shape != keys.shape:
            raise ValueError(f"scores shape {tuple(scores.shape)} does not match keys shape {tuple(keys.shape)}")
        if scores.device != self.device:
            raise ValueError(f"scores are on {scores.device} but the table is on {self.device}")


def _normalize_device(device: torch.device | str | None) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _empty_slots(device: torch.device) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.int64, device=device)


def _empty_result(device: torch.device) -> InsertResult:
    empty = _empty_slots(device)
    return InsertResult(empty, torch.zeros(0, dtype=torch.bool, device=device), empty, empty, empty)
