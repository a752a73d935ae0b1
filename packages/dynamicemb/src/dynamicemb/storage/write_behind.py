"""A :class:`Storage` wrapper that writes to its store from a background thread."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from dynamicemb.masks import positions
from dynamicemb.storage.base import Storage
from dynamicemb.storage.row_codec import StorageError

__all__ = ["WriteBehindStorage"]


@dataclass(frozen=True)
class _Batch:
    keys: torch.Tensor  # [N] sorted, unique, host
    values: torch.Tensor  # [N, value_dim] host
    scores: torch.Tensor  # [N] host


def _positions_in(batch: _Batch, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(where, rows)``: positions in ``keys`` of the keys ``batch`` holds, and their rows in ``batch``."""
    rows = torch.searchsorted(batch.keys, keys).clamp(max=max(batch.keys.numel() - 1, 0))
    hit = batch.keys[rows] == keys if batch.keys.numel() else torch.zeros_like(keys, dtype=torch.bool)
    where = positions(hit)
    return where, rows[where]


class WriteBehindStorage(Storage):
    """Inserts into ``inner`` (e.g. a :class:`RocksDBStorage` or :class:`RedisStorage`) from one
    background thread, so the rows a device cache evicts are written while training goes on.

    :meth:`insert` copies the rows to host memory, queues them and returns; at most
    ``max_pending_rows`` rows wait (an insert past that waits for the thread). Reads see queued
    rows: :meth:`find` and :meth:`contains` overlay them, newest last, on what ``inner`` returns.
    :meth:`erase`, :meth:`dump`, :meth:`load`, :meth:`size` and :meth:`flush` first wait until the
    queue is written. After a failed background write every call raises :class:`StorageError`;
    its rows stay queued, not dropped. Inserts must come from one thread; reads from any.
    """

    def __init__(self, inner: Storage, max_pending_rows: int = 1 << 20) -> None:
        if max_pending_rows <= 0:
            raise ValueError(f"WriteBehindStorage: max_pending_rows must be positive, got {max_pending_rows}")
        self.inner = inner
        self.max_pending_rows = max_pending_rows
        self._pending: deque[_Batch] = deque()
        self._pending_rows = 0
        self._error: BaseException | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._write_loop, name="dynamicemb-write-behind", daemon=True)
        self._thread.start()

    @property
    def value_dim(self) -> int:
        return self.inner.value_dim

    @property
    def pending_rows(self) -> int:
        """Rows queued and not yet written."""
        return self._pending_rows

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    # --- the background thread ---------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            with self._changed:
                while not self._closed and (not self._pending or self._error is not None):
                    self._changed.wait()
                if self._closed and (not self._pending or self._error is not None):
                    return
                batch = self._pending[0]
            try:
                self.inner.insert(batch.keys, batch.values, batch.scores)
            except BaseException as exc:  # kept for the caller's next call
                with self._changed:
                    self._error = exc
                    self._changed.notify_all()
                continue
            with self._changed:
                self._pending.popleft()
                self._pending_rows -= batch.keys.numel()
                self._changed.notify_all()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise StorageError(
                f"a background write to {type(self.inner).__name__} failed; its rows are still queued: "
                f"{type(self._error).__name__}: {self._error}"
            ) from self._error

    def _drain(self) -> None:
        """Wait until every queued row is written (or a write failed: then raise)."""
        with self._changed:
            while self._pending and self._error is None:
                self._changed.wait()
            self._raise_error()

    # --- Storage --------------------------------------------------------------------------------
    def _queued(self) -> list[_Batch]:
        """The queue now; taken before reading ``inner``, so a batch written meanwhile is in both."""
        with self._changed:
            self._raise_error()
            return list(self._pending)

    def find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``inner`` holds, with the queued rows (oldest first) laid over it."""
        host_keys = keys.cpu()
        queued = self._queued()
        values, found = self.inner.find(host_keys)
        values, found = values.cpu(), found.cpu().clone()
        for batch in queued:
            where, rows = _positions_in(batch, host_keys)
            values[where] = batch.values[rows]
            found[where] = True
        return values.to(keys.device), found.to(keys.device)

    def find_scores(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        host_keys = keys.cpu()
        queued = self._queued()
        scores, found = self.inner.find_scores(host_keys)
        scores, found = scores.cpu().clone(), found.cpu().clone()
        for batch in queued:
            where, rows = _positions_in(batch, host_keys)
            scores[where] = batch.scores[rows]
            found[where] = True
        return scores.to(keys.device), found.to(keys.device)

    def insert(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """Queue the rows (copied); ``scores`` ``None`` keeps the scores of stored keys (0 for new ones)."""
        if values.shape != (keys.numel(), self.value_dim):
            raise ValueError(
                f"WriteBehindStorage.insert: values {tuple(values.shape)}, expected {(keys.numel(), self.value_dim)}"
            )
        if keys.numel() == 0:
            return
        if scores is None:
            self._drain()  # the stored scores are those of the queued rows or of inner
            self.inner.insert(keys, values, None)
            return
        host_keys, order = keys.cpu().sort()
        batch = _Batch(
            host_keys,
            values.detach()[order.to(values.device)].to("cpu", self.dtype),
            scores.detach()[order.to(scores.device)].to("cpu", torch.int64),
        )
        with self._changed:
            while self._pending_rows and self._pending_rows + batch.keys.numel() > self.max_pending_rows:
                if self._error is not None:
                    break
                self._changed.wait()
            self._raise_error()
            self._pending.append(batch)
            self._pending_rows += batch.keys.numel()
            self._changed.notify_all()

    def erase(self, keys: torch.Tensor) -> torch.Tensor:
        self._drain()
        return self.inner.erase(keys)

    def dump(
        self, min_score: int | None = None, batch_size: int = 65536
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self._drain()
        yield from self.inner.dump(min_score, batch_size)

    def load(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> None:
        self._drain()
        self.inner.load(keys, values, scores)

    def size(self) -> int:
        self._drain()
        return self.inner.size()

    def flush(self) -> None:
        """Write every queued row, then flush ``inner``."""
        self._drain()
        self.inner.flush()

    def close(self) -> None:
        """Write the queue, stop the thread and close ``inner`` (if it can be closed)."""
        try:
            self._drain()
        finally:
            with self._changed:
                self._closed = True
                self._changed.notify_all()
            self._thread.join()
        close = getattr(self.inner, "close", None)
        if callable(close):
            close()

    def describe(self) -> dict[str, Any]:
        describe = getattr(self.inner, "describe", None)
        inner = describe() if callable(describe) else {"type": type(self.inner).__name__}
        return {"type": "WriteBehindStorage", "inner": inner, "max_pending_rows": self.max_pending_rows}
