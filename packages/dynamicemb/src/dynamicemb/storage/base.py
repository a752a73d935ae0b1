"""The :class:`Storage` interface: key -> value row, for rows kept outside the device table."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch

__all__ = ["Storage"]


class Storage(ABC):
    """A key-value store of value rows (``[embedding | optimizer state]``, ``value_dim`` columns).

    Implement it to keep a table's rows in your own store (a Python dict, a key-value server) and
    pass it as ``DynamicEmbTableOptions(external_storage=...)``: a device cache then sits in front
    of it, reads missing rows from it and writes evicted rows back to it. Tensors may be on any
    device; callers move them. Keys are int64.
    """

    @property
    @abstractmethod
    def value_dim(self) -> int:
        """Columns of a value row."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """dtype of value rows."""

    @abstractmethod
    def find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys [N]`` -> ``(values [N, value_dim], found [N] bool)``; rows of missing keys are unspecified."""

    @abstractmethod
    def insert(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """Insert or overwrite ``keys [N]`` (unique) with ``values [N, value_dim]`` and ``scores [N]``
        int64 (``None``: the store's own choice)."""

    @abstractmethod
    def dump(
        self, min_score: int | None = None, batch_size: int = 65536
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every stored row (with ``score >= min_score`` if given), in batches of at most
        ``batch_size``: ``(keys [M], values [M, value_dim], scores [M] int64)``."""

    @abstractmethod
    def load(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> None:
        """Restore rows written by :meth:`dump` (keys unique), keeping their scores."""

    @abstractmethod
    def size(self) -> int:
        """Number of stored keys."""

    def contains(self, keys: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: which keys are stored."""
        return self.find(keys)[1]

    def find_scores(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys [N]`` -> ``(scores [N] int64, found [N] bool)``; missing keys read as 0. With it, an
        LFU table over this storage keeps the counts of keys coming back into its cache."""
        raise NotImplementedError(f"{type(self).__name__} does not read scores")

    def erase(self, keys: torch.Tensor) -> torch.Tensor:
        """Remove ``keys [N]``; ``[N]`` bool, True where a key was stored."""
        raise NotImplementedError(f"{type(self).__name__} does not erase keys")

    def flush(self) -> None:  # noqa: B027 (optional: rows in memory have nothing to flush)
        """Make every row inserted so far durable, for stores that keep rows on disk or on a
        server (nothing to do for rows in memory)."""
