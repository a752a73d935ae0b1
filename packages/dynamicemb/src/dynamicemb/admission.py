"""Feature admission: a new key enters a table only once it has been seen often enough."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch

from dynamicemb.hash_index import create_hash_table
from dynamicemb.hash_index.base import DynamicEmbScoreStrategy
from dynamicemb.initializer import DynamicEmbInitializerArgs
from dynamicemb.masks import positions

__all__ = ["AdmissionStrategy", "Counter", "FrequencyAdmissionStrategy", "KVCounter"]


class Counter(ABC):
    """A counter table: key -> how often the key was seen while not admitted."""

    @abstractmethod
    def add(self, keys: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
        """Add ``frequencies [N]`` int64 to unique ``keys [N]``; return the accumulated counts ``[N]``."""

    @abstractmethod
    def erase(self, keys: torch.Tensor) -> None:
        """Forget ``keys`` (called once they are admitted)."""

    @abstractmethod
    def dump(self, batch_size: int = 65536) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every counted key, in batches of at most ``batch_size``: ``(keys [M] int64, counts [M] int64)``."""

    @abstractmethod
    def load(self, keys: torch.Tensor, counts: torch.Tensor) -> None:
        """Set the counts of unique ``keys [M]`` to ``counts [M]`` (rows written by :meth:`dump`)."""


class KVCounter(Counter):
    """A bucketed hash table of counts with a fixed capacity; a full bucket forgets its lowest count.

    ``capacity`` slots on ``device`` (one int64 count per slot beside the index). ``backend``: the
    index implementation (:func:`~dynamicemb.hash_index.create_hash_table`). ``deterministic``: the
    index's placement mode (:mod:`dynamicemb.deterministic`; ``None`` follows
    ``torch.are_deterministic_algorithms_enabled()``): when on, which keys keep a count when buckets
    are full, and their counts, depend only on the counter and the set of keys of each call, not on
    their order or on thread scheduling. A table with an admission strategy creates its counter with
    its own ``deterministic`` option and hash backend.
    """

    def __init__(
        self,
        capacity: int,
        bucket_capacity: int = 128,
        device: torch.device | str | None = None,
        *,
        backend: str = "auto",
        deterministic: bool | None = None,
    ) -> None:
        self.index = create_hash_table(
            init_capacity=capacity,
            max_capacity=capacity,
            bucket_capacity=bucket_capacity,
            max_load_factor=1.0,
            score_strategy=DynamicEmbScoreStrategy.CUSTOMIZED,
            device=device,
            backend=backend,
            deterministic=deterministic,
        )
        self.device = self.index.device
        self.counts = torch.zeros(self.index.capacity, dtype=torch.int64, device=self.device)

    def add(self, keys: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
        keys = keys.to(self.device)
        slots, found = self.index.find(keys)
        previous = torch.where(found, self.counts[slots.clamp(min=0)], 0)
        accumulated = previous + frequencies.to(self.device, torch.int64)
        result = self.index.insert_or_assign(keys, accumulated)
        stored = positions(result.slots >= 0)
        self.counts[result.slots[stored]] = accumulated[stored]
        return accumulated

    def erase(self, keys: torch.Tensor) -> None:
        self.index.erase(keys.to(self.device))

    def dump(self, batch_size: int = 65536) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.index.capacity, batch_size):
            keys, slots, _ = self.index.export_batch(start, batch_size)
            if keys.numel():
                yield keys, self.counts[slots]

    def load(self, keys: torch.Tensor, counts: torch.Tensor) -> None:
        keys, counts = keys.to(self.device), counts.to(self.device, torch.int64)
        result = self.index.insert_or_assign(keys, counts)
        stored = positions(result.slots >= 0)
        self.counts[result.slots[stored]] = counts[stored]

    def size(self) -> int:
        return self.index.size()


class AdmissionStrategy(ABC):
    """Decides which keys not yet in a table are admitted into it."""

    @abstractmethod
    def admit(self, keys: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool for ``keys [N]`` with accumulated ``frequencies [N]``."""

    @abstractmethod
    def initializer_args(self) -> DynamicEmbInitializerArgs | None:
        """Values returned in forward for keys not admitted (``None``: the table's initializer)."""

    def describe(self) -> dict[str, Any]:
        return {"type": type(self).__name__}


class FrequencyAdmissionStrategy(AdmissionStrategy):
    """Admit a key once it has been seen ``threshold`` times (counted over batches, duplicates included)."""

    def __init__(self, threshold: int, initializer_args: DynamicEmbInitializerArgs | None = None) -> None:
        if threshold < 1:
            raise ValueError(f"FrequencyAdmissionStrategy: threshold must be >= 1, got {threshold}")
        self.threshold = threshold
        self._initializer_args = initializer_args

    def admit(self, keys: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
        return frequencies >= self.threshold

    def initializer_args(self) -> DynamicEmbInitializerArgs | None:
        return self._initializer_args

    def describe(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "threshold": self.threshold}
