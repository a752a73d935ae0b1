"""A :class:`Storage` on local disk: the rows of one table in a RocksDB database (``rocksdict``)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

import torch

from dynamicemb.storage.base import Storage
from dynamicemb.storage.row_codec import RowCodec, StorageError, require

__all__ = ["RocksDBStorage"]

_META_KEY = b"dynamicemb.meta"  # never 8 bytes long, so never a row key
_FORMAT = 1


def _hint(message: str) -> str:
    """What RocksDB's status text means for the user."""
    lowered = message.lower()
    if "corrupt" in lowered or "checksum" in lowered or "does not end with newline" in lowered:
        return "the database is corrupted"
    if re.search(r"\block\b", lowered):  # the LOCK file, not a "block"
        return "it is locked: another process or another storage of this process has it open"
    if "permission denied" in lowered or "read-only file system" in lowered or "read only mode" in lowered:
        return "it cannot be written (read-only directory, file system or open mode)"
    if "no space left" in lowered or "file too large" in lowered:
        return "the disk is full (or a file size limit was reached)"
    return "RocksDB failed"


class RocksDBStorage(Storage):
    """The rows ``[embedding | optimizer state]`` of one table, with their scores, in a RocksDB
    database in the directory ``path`` (created if missing; one directory per table).

    Reads and writes go by batches of at most ``batch_rows`` keys (one multi-get, or one atomic
    write batch, each); RocksDB keeps at most about ``memory_budget_bytes`` in memory (half block
    cache, half write buffers), the rest on disk (its files are read through mmap, so the
    operating system's page cache may hold more of them, outside this budget and reclaimable).
    Writes reach RocksDB's write-ahead log; with ``sync_writes`` each batch is synced to disk,
    otherwise :meth:`flush` makes them durable.
    ``read_only`` opens the database for reading only (several processes may do so at once).
    The directory remembers ``value_dim`` and ``dtype``; reopening it with other ones fails.
    Errors raise :class:`StorageError` naming the directory.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        value_dim: int,
        dtype: torch.dtype = torch.float32,
        *,
        memory_budget_bytes: int = 64 << 20,
        batch_rows: int = 65536,
        sync_writes: bool = False,
        read_only: bool = False,
    ) -> None:
        if value_dim <= 0 or batch_rows <= 0 or memory_budget_bytes <= 0:
            raise ValueError(
                f"RocksDBStorage: value_dim, batch_rows and memory_budget_bytes must be positive, got "
                f"{value_dim}, {batch_rows}, {memory_budget_bytes}"
            )
        self._rocksdict = require("rocksdict", "rocksdb", "RocksDBStorage")
        self.path = os.path.abspath(os.fspath(path))
        self._codec = RowCodec(b"", value_dim, dtype)
        self.batch_rows = batch_rows
        self.read_only = read_only
        self._write_options = self._rocksdict.WriteOptions()
        self._write_options.sync = sync_writes
        self._db = self._open(memory_budget_bytes)
        self._check_meta()

    # --- opening ------------------------------------------------------------------------------
    def _error(self, doing: str, exc: BaseException) -> StorageError:
        return StorageError(f"RocksDB at {self.path}: {doing}: {_hint(str(exc))} ({exc})")

    def _options(self, memory_budget_bytes: int) -> Any:
        rocksdict = self._rocksdict
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(not self.read_only)
        options.set_paranoid_checks(True)
        options.set_write_buffer_size(max(memory_budget_bytes // 4, 1 << 20))
        options.set_max_write_buffer_number(2)
        # Bloom filters, a hashed data-block index and a block cache of half the budget (in MiB);
        # table files read through mmap (gathers of 16K random rows of dim 128: 25% faster).
        options.optimize_for_point_lookup(max(memory_budget_bytes >> 21, 1))
        options.set_allow_mmap_reads(True)
        return options

    def _open(self, memory_budget_bytes: int) -> Any:
        rocksdict = self._rocksdict
        if self.read_only and not os.path.isdir(self.path):
            raise StorageError(f"RocksDB at {self.path}: cannot open read-only: no such directory")
        access = rocksdict.AccessType.read_only() if self.read_only else rocksdict.AccessType.read_write()
        try:
            return rocksdict.Rdict(self.path, self._options(memory_budget_bytes), access_type=access)
        except Exception as exc:  # rocksdict raises plain Exception with RocksDB's status text
            raise self._error("cannot open", exc) from exc

    def _check_meta(self) -> None:
        wanted = {"format": _FORMAT, "value_dim": self.value_dim, "dtype": str(self.dtype).removeprefix("torch.")}
        stored = self._call("read metadata", "get", _META_KEY)
        if stored is None:
            if self.read_only:
                raise StorageError(f"RocksDB at {self.path}: not a dynamicemb store (no metadata)")
            self._call("write metadata", "put", _META_KEY, json.dumps(wanted).encode())
            return
        meta = json.loads(stored)
        if meta != wanted:
            self.close()
            raise StorageError(
                f"RocksDB at {self.path}: holds rows of {meta.get('value_dim')} x {meta.get('dtype')} "
                f"(format {meta.get('format')}), this table needs {wanted['value_dim']} x {wanted['dtype']}"
            )

    def _call(self, doing: str, method: str, *args: Any) -> Any:
        """``self._db.<method>(*args)``, its failures raised as :class:`StorageError`."""
        if self._db is None:
            raise StorageError(f"RocksDB at {self.path}: cannot {doing}: the storage was closed")
        try:
            return getattr(self._db, method)(*args)
        except Exception as exc:
            raise self._error(f"cannot {doing}", exc) from exc

    # --- Storage ------------------------------------------------------------------------------
    @property
    def value_dim(self) -> int:
        return self._codec.value_dim

    @property
    def dtype(self) -> torch.dtype:
        return self._codec.dtype

    def _find_with_scores(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reads in key order (the order of the files on disk, several times faster than random)."""
        keys, order = keys.cpu().sort()
        parts = []
        for start in range(0, keys.numel(), self.batch_rows):
            stored = self._call("read", "get", self._codec.encode_keys(keys[start : start + self.batch_rows]))
            parts.append(self._codec.decode_rows(stored, f"RocksDB at {self.path}"))
        if not parts:
            return self._codec.decode_rows([], "")
        values, scores, found = (torch.cat(p) for p in zip(*parts))
        unsorted = torch.empty_like(order)
        unsorted[order] = torch.arange(order.numel())
        return values[unsorted], scores[unsorted], found[unsorted]

    def find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, _, found = self._find_with_scores(keys)
        return values.to(keys.device), found.to(keys.device)

    def find_scores(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, scores, found = self._find_with_scores(keys)
        return scores.to(keys.device), found.to(keys.device)

    def insert(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """Insert or overwrite; ``scores`` ``None`` keeps the scores of stored keys (0 for new ones)."""
        if values.shape != (keys.numel(), self.value_dim):
            raise ValueError(
                f"RocksDBStorage.insert: values {tuple(values.shape)}, expected {(keys.numel(), self.value_dim)}"
            )
        keys, order = keys.cpu().sort()
        values = values[order.to(values.device)]
        scores = self._find_with_scores(keys)[1] if scores is None else scores[order.to(scores.device)]
        for start in range(0, keys.numel(), self.batch_rows):
            end = start + self.batch_rows
            batch = self._rocksdict.WriteBatch(raw_mode=True)
            for key, row in zip(
                self._codec.encode_keys(keys[start:end]), self._codec.encode_rows(values[start:end], scores[start:end])
            ):
                batch.put(key, row)
            self._call("write", "write", batch, self._write_options)

    def erase(self, keys: torch.Tensor) -> torch.Tensor:
        found = self._find_with_scores(keys)[2]
        encoded = self._codec.encode_keys(keys)
        for start in range(0, len(encoded), self.batch_rows):
            batch = self._rocksdict.WriteBatch(raw_mode=True)
            for key in encoded[start : start + self.batch_rows]:
                batch.delete(key)
            self._call("delete", "write", batch, self._write_options)
        return found.to(keys.device)

    def _decoded(self, stored_keys: list[bytes], stored_rows: list[bytes], min_score: int | None) -> tuple:
        values, scores, _ = self._codec.decode_rows(stored_rows, f"RocksDB at {self.path}")
        keys = self._codec.decode_keys(stored_keys)
        if min_score is not None:
            keep = scores >= min_score
            keys, values, scores = keys[keep], values[keep], scores[keep]
        return keys, values, scores

    def dump(
        self, min_score: int | None = None, batch_size: int = 65536
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every row in key order, read from one snapshot of the database."""
        stored_keys: list[bytes] = []
        stored_rows: list[bytes] = []
        rows = self._call("read while dumping", "items")
        try:
            for key, row in rows:
                if len(key) != 8:
                    continue
                stored_keys.append(key)
                stored_rows.append(row)
                if len(stored_keys) == batch_size:
                    batch = self._decoded(stored_keys, stored_rows, min_score)
                    stored_keys, stored_rows = [], []
                    if batch[0].numel():
                        yield batch
        except StorageError:
            raise
        except Exception as exc:
            raise self._error("cannot read while dumping", exc) from exc
        if stored_keys:
            batch = self._decoded(stored_keys, stored_rows, min_score)
            if batch[0].numel():
                yield batch

    def load(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> None:
        self.insert(keys, values, scores)

    def size(self) -> int:
        keys = self._call("count keys", "keys")
        try:
            return sum(1 for key in keys if len(key) == 8)
        except Exception as exc:
            raise self._error("cannot count keys", exc) from exc

    def flush(self) -> None:
        """Write the memory tables to disk and sync the write-ahead log: every row inserted so far
        survives a crash of the process or of the machine."""
        if self.read_only:
            return
        self._call("flush", "flush", True)
        self._call("sync the write-ahead log", "flush_wal", True)

    def close(self) -> None:
        """Flush and close the database (the directory can then be opened again)."""
        if self._db is not None:
            self._call("close", "close")
            self._db = None

    def __enter__(self) -> RocksDBStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        return {"type": "RocksDBStorage", "path": self.path, "value_dim": self.value_dim}
