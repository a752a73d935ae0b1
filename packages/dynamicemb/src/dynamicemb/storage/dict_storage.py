"""A :class:`Storage` backed by a Python dict (host memory): a reference and a template."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from dynamicemb.storage.base import Storage

__all__ = ["PyDictStorage"]


class PyDictStorage(Storage):
    """Maps each key to a row of a growing host tensor (rows of erased keys are reused).
    Unbounded: nothing is ever evicted."""

    def __init__(self, value_dim: int, dtype: torch.dtype = torch.float32) -> None:
        self._value_dim = value_dim
        self._dtype = dtype
        self._row_of: dict[int, int] = {}
        self._free_rows: list[int] = []
        self._used_rows = 0
        self._rows = torch.empty((0, value_dim), dtype=dtype)
        self._scores = torch.empty((0,), dtype=torch.int64)

    @property
    def value_dim(self) -> int:
        return self._value_dim

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def size(self) -> int:
        return len(self._row_of)

    def _rows_of(self, keys: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self._row_of.get(k, -1) for k in keys.tolist()], dtype=torch.int64)

    def find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows_of(keys.cpu())
        found = rows >= 0
        values = torch.zeros((rows.numel(), self._value_dim), dtype=self._dtype)
        values[found] = self._rows[rows[found]]
        return values.to(keys.device), found.to(keys.device)

    def find_scores(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows_of(keys.cpu())
        found = rows >= 0
        scores = torch.where(found, self._scores[rows.clamp(min=0)], 0) if rows.numel() else rows
        return scores.to(keys.device), found.to(keys.device)

    def insert(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        keys = keys.cpu()
        if values.shape != (keys.numel(), self._value_dim):
            raise ValueError(
                f"PyDictStorage.insert: values {tuple(values.shape)}, expected {(keys.numel(), self._value_dim)}"
            )
        rows = self._rows_of(keys)
        new = rows < 0
        num_new = int(new.sum())
        if num_new:
            rows[new] = self._claim_rows(num_new)
            for key, row in zip(keys[new].tolist(), rows[new].tolist()):
                self._row_of[key] = row
        self._rows[rows] = values.detach().to("cpu", self._dtype)
        if scores is not None:
            self._scores[rows] = scores.cpu().to(torch.int64)
        else:
            self._scores[rows[new]] = 0

    def _claim_rows(self, n: int) -> torch.Tensor:
        reused = self._free_rows[len(self._free_rows) - n :] if n <= len(self._free_rows) else self._free_rows
        del self._free_rows[len(self._free_rows) - len(reused) :]
        start, fresh = self._used_rows, n - len(reused)
        self._ensure_rows(start + fresh)
        self._used_rows += fresh
        return torch.tensor(reused + list(range(start, start + fresh)), dtype=torch.int64)

    def erase(self, keys: torch.Tensor) -> torch.Tensor:
        """Forget ``keys``; their rows are reused by later insertions."""
        rows = [self._row_of.pop(k, -1) for k in keys.cpu().tolist()]
        self._free_rows += [row for row in rows if row >= 0]
        return torch.tensor([row >= 0 for row in rows], dtype=torch.bool, device=keys.device)

    def _ensure_rows(self, n: int) -> None:
        if n <= self._rows.shape[0]:
            return
        capacity = max(n, 2 * self._rows.shape[0], 64)
        rows = torch.zeros((capacity, self._value_dim), dtype=self._dtype)
        scores = torch.zeros((capacity,), dtype=torch.int64)
        rows[: self._rows.shape[0]] = self._rows
        scores[: self._scores.shape[0]] = self._scores
        self._rows, self._scores = rows, scores

    def dump(
        self, min_score: int | None = None, batch_size: int = 65536
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        keys = torch.tensor(list(self._row_of.keys()), dtype=torch.int64)
        rows = torch.tensor(list(self._row_of.values()), dtype=torch.int64)
        if min_score is not None:
            keep = self._scores[rows] >= min_score
            keys, rows = keys[keep], rows[keep]
        for start in range(0, keys.numel(), batch_size):
            sel = rows[start : start + batch_size]
            yield keys[start : start + batch_size], self._rows[sel].clone(), self._scores[sel].clone()

    def load(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> None:
        self.insert(keys, values, scores)
