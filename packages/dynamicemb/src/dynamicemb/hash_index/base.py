"""The contract every hash-table backend implements: int64 keys -> slots, one score per slot.

The index knows nothing about values. A slot is a row number in ``[0, capacity)``; value storage
(``dynamicemb.storage``) keeps one row per slot. When the index grows (rehash by doubling) slots
move, and :meth:`ScoredHashTable.reserve` returns the :class:`SlotRemap` so value storage can move
its rows the same way.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch


class DynamicEmbScoreStrategy(enum.IntEnum):
    """How a slot's score is set on insertion/lookup; the lowest score is evicted first."""

    TIMESTAMP = 0  # LRU: score = a global clock that advances each call
    STEP = 1  # score = the training step the caller passes (``set_step``)
    LFU = 2  # score = access count
    CUSTOMIZED = 3  # score = caller-provided tensor
    NO_EVICTION = 4  # never evict; grow up to max_capacity, then a clear error


@dataclass(frozen=True)
class SlotRemap:
    """Rows of value storage to move after a rehash: ``new[new_slots] = old[old_slots]`` (both ``[M]`` int64)."""

    old_capacity: int
    new_capacity: int
    old_slots: torch.Tensor
    new_slots: torch.Tensor


Evicted = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class InsertResult:
    """Result of an insertion over a batch of ``N`` keys.

    slots:         ``[N]`` int64, the key's slot, ``-1`` where the key was refused (its score was
                   lower than every slot of its full bucket) or could not be placed.
    existed:       ``[N]`` bool, the key was already in the table before this call.
    evicted_keys:  ``[E]`` int64 keys pushed out to make room.
    evicted_slots: ``[E]`` int64 the slots they held (now reused by inserted keys; value storage
                   must read the evicted rows from these slots *before* writing the new ones).
    evicted_scores:``[E]`` int64 their scores.

    The evicted entries may be given as a function that compacts them (``evicted=``): it runs at
    the first read of one of the three (its size ``E`` needs a device-to-host synchronization), so
    a caller that never reads them never waits for the device.
    """

    __slots__ = ("_evicted", "existed", "slots")

    def __init__(
        self,
        slots: torch.Tensor,
        existed: torch.Tensor,
        evicted_keys: torch.Tensor | None = None,
        evicted_slots: torch.Tensor | None = None,
        evicted_scores: torch.Tensor | None = None,
        *,
        evicted: Callable[[], Evicted] | None = None,
    ) -> None:
        given = (evicted_keys, evicted_slots, evicted_scores)
        if (evicted is None) == any(t is None for t in given):
            raise ValueError("InsertResult needs the three evicted tensors or an evicted= function, not both")
        self.slots = slots
        self.existed = existed
        self._evicted: Evicted | Callable[[], Evicted] = evicted if evicted is not None else given  # type: ignore[assignment]

    def evicted(self) -> Evicted:
        """``(evicted_keys, evicted_slots, evicted_scores)``, compacted at the first call."""
        if callable(self._evicted):
            self._evicted = self._evicted()
        return self._evicted

    @property
    def evicted_keys(self) -> torch.Tensor:
        return self.evicted()[0]

    @property
    def evicted_slots(self) -> torch.Tensor:
        return self.evicted()[1]

    @property
    def evicted_scores(self) -> torch.Tensor:
        return self.evicted()[2]

    @property
    def refused(self) -> torch.Tensor:
        """``[N]`` bool: keys that were not inserted."""
        return self.slots < 0


class ScoredHashTable(ABC):
    """Bucketed, scored hash index over int64 keys.

    Keys may be any int64 value (including ``INT64_MIN``/``INT64_MAX``); internal sentinels never
    collide with user keys. Duplicate keys inside one batch resolve to the same slot. All methods
    take and return tensors on :attr:`device`.
    """

    device: torch.device
    bucket_capacity: int
    max_capacity: int
    max_load_factor: float
    score_strategy: DynamicEmbScoreStrategy

    @property
    @abstractmethod
    def capacity(self) -> int:
        """Current number of slots (``num_buckets * bucket_capacity``)."""

    @abstractmethod
    def size(self) -> int:
        """Number of occupied slots."""

    def load_factor(self) -> float:
        return self.size() / self.capacity

    @abstractmethod
    def reserve(self, num_new_keys: int) -> SlotRemap | None:
        """Grow by doubling (up to ``max_capacity``) if ``size + num_new_keys`` would exceed
        ``max_load_factor * capacity``; return the slot remap, or ``None`` if nothing moved."""

    @abstractmethod
    def find(self, keys: torch.Tensor, update_score: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys [N]`` -> ``(slots [N] int64 (-1 if missing), found [N] bool)``."""

    @abstractmethod
    def find_or_insert(
        self, keys: torch.Tensor, scores: torch.Tensor | None = None, *, unique_keys: bool = False
    ) -> InsertResult:
        """Find each key; insert the missing ones (evicting the lowest score of a full bucket).

        ``unique_keys``: the caller guarantees the keys are distinct, so a backend may skip
        deduplicating them (duplicate keys with this flag may corrupt the table)."""

    @abstractmethod
    def insert_or_assign(
        self, keys: torch.Tensor, scores: torch.Tensor | None = None, *, unique_keys: bool = False
    ) -> InsertResult:
        """Insert missing keys, and for present keys assign the score (CUSTOMIZED) or refresh it."""

    def insert_and_evict(
        self, keys: torch.Tensor, scores: torch.Tensor | None = None, *, unique_keys: bool = False
    ) -> InsertResult:
        """Like :meth:`insert_or_assign`; the evicted keys/slots/scores are the point of the call."""
        return self.insert_or_assign(keys, scores, unique_keys=unique_keys)

    @abstractmethod
    def scores_at(self, slots: torch.Tensor) -> torch.Tensor:
        """``slots [N]`` int64 of occupied slots (e.g. from :meth:`find`) -> their scores ``[N]`` int64."""

    @abstractmethod
    def erase(self, keys: torch.Tensor) -> torch.Tensor:
        """Remove keys; returns ``[N]`` bool, True where a key was present and removed."""

    @abstractmethod
    def export_batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Occupied entries among slots ``[start, start+count)``: ``(keys [M], slots [M], scores [M])``."""

    def export_batch_if(
        self, start: int, count: int, min_score: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Like :meth:`export_batch`, keeping entries whose score is ``>= min_score``."""
        keys, slots, scores = self.export_batch(start, count)
        keep = scores >= min_score
        return keys[keep], slots[keep], scores[keep]

    @abstractmethod
    def set_step(self, step: int) -> None:
        """The step used as score by the STEP strategy."""
