"""The on-disk format of one dumped table (``<table>.dynamicemb``).

Layout (all integers little-endian, arrays row-major)::

    MAGIC                       8 bytes  b"DYNEMB\\x00\\x01"
    row chunk 0 .. C-1          each of n rows:
        keys                    n * int64
        scores                  n * int64
        embeddings              n * dim * <dtype>
        optimizer state         n * state_dim * <dtype>   (only if has_optimizer_state)
    counter chunk 0 .. K-1      (format 2; only for tables with an admission counter) each of m keys:
        keys                    m * int64
        counts                  m * int64
    footer                      UTF-8 JSON (below)
    footer length               uint64
    MAGIC                       8 bytes

Footer fields: ``format_version`` (2; files of version 1 still load), ``table``, ``dim``,
``dtype`` ("float32", "float16", "bfloat16"), ``num_rows``, ``chunk_rows`` (rows of each row
chunk), ``has_optimizer_state``, ``optimizer_state_dim``, ``optimizer``
(:class:`DynamicEmbOptimizerArgs` as JSON), ``optimizer_step``, ``score_strategy``,
``score_clock`` (the table's step / custom score / last timestamp), ``options``
(:class:`DynamicEmbTableOptions` as JSON) and ``crc32`` (of every chunk byte, row and counter
chunks in file order). Format 2 adds ``cached_rows``: the leading rows that were in the device
cache of a ``caching`` / ``external_storage`` table (0 otherwise; a load puts them back into the
cache and the other rows into the backing storage), and ``counter_chunk_rows``: the keys of each
counter chunk, the not-yet-admitted keys of a table with an admission strategy and how often each
was seen (``[]`` without one). A version-1 file reads as ``cached_rows`` 0 and no counters. A
reader checks both magics, the footer, the file size against the chunk sizes and the checksum
before anything is loaded.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from dynamicemb.embedding_table import DynamicEmbeddingTable
from dynamicemb.options import options_to_json
from dynamicemb.storage.cached_store import CachedKeyValueTable

__all__ = [
    "FORMAT_VERSION",
    "DynamicEmbFileError",
    "RowChunk",
    "TableFile",
    "TableSnapshot",
    "path_inside",
    "write_table_file",
]

MAGIC = b"DYNEMB\x00\x01"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_COUNTER_ROW_BYTES = 16
_U64 = struct.Struct("<Q")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_READ_BLOCK = 1 << 24

if sys.byteorder != "little":  # the format stores the host's tensor bytes as they are
    raise ImportError("dynamicemb's dump format needs a little-endian host")


class DynamicEmbFileError(ValueError):
    """A dump file is corrupt, truncated or does not match the table it is loaded into."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


def path_inside(folder: str, name: str, source: str) -> str:
    """``folder/name`` for a plain ``name`` that resolves (symbolic links followed) inside ``folder``; else
    :class:`DynamicEmbFileError` naming ``source`` (the file the name was read from, or the folder) and
    ``name``. Names read from dump files never reach outside the dump."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
    if not plain or os.path.isabs(name):
        raise DynamicEmbFileError(source, f"names {name!r}, which is not a plain file name inside {folder}")
    path = os.path.join(folder, name)
    real_folder, real = os.path.realpath(folder), os.path.realpath(path)
    if not real.startswith(real_folder.rstrip(os.sep) + os.sep):
        raise DynamicEmbFileError(source, f"{name!r} resolves to {real}, outside {real_folder}")
    return path


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(-1).data


def _cached_rows(table: DynamicEmbeddingTable) -> int:
    """How many leading rows of :meth:`DynamicEmbeddingTable.export` come from the device cache."""
    store = table.store
    return store.cache.size() if isinstance(store, CachedKeyValueTable) else 0


def _footer_fields(table: DynamicEmbeddingTable) -> dict[str, Any]:
    """The footer fields that describe the table (not its rows)."""
    return {
        "table": table.name,
        "dim": table.dim,
        "dtype": _DTYPE_NAMES[table.dtype],
        "optimizer_state_dim": table.optimizer.state_dim,
        "optimizer": table.optimizer.args.to_json(),
        "optimizer_step": table.optimizer.step,
        "score_strategy": table.options.score_strategy.name,
        "score_clock": table.score_clock(),
        "options": options_to_json(table.options),
    }


RowBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # keys, embeddings, state, scores
CounterBatch = tuple[torch.Tensor, torch.Tensor]  # keys, counts


def _write_chunks(
    file: BinaryIO,
    rows: Iterable[RowBatch],
    counters: Iterable[CounterBatch],
    fields: dict[str, Any],
    cached_rows: int,
    optim: bool,
) -> int:
    file.write(MAGIC)
    crc = 0

    def write_arrays(arrays: list[torch.Tensor]) -> None:
        nonlocal crc
        for array in arrays:
            data = _tensor_bytes(array)
            file.write(data)
            crc = zlib.crc32(data, crc)

    chunk_rows: list[int] = []
    for keys, embeddings, state, scores in rows:
        write_arrays([keys, scores, embeddings] + ([state] if optim else []))
        chunk_rows.append(keys.numel())
    counter_chunk_rows: list[int] = []
    for keys, counts in counters:
        write_arrays([keys.to(torch.int64), counts.to(torch.int64)])
        counter_chunk_rows.append(keys.numel())
    footer: dict[str, Any] = {
        **fields,
        "format_version": FORMAT_VERSION,
        "num_rows": sum(chunk_rows),
        "chunk_rows": chunk_rows,
        "cached_rows": cached_rows,
        "counter_chunk_rows": counter_chunk_rows,
        "has_optimizer_state": optim,
        "crc32": crc,
    }
    encoded = json.dumps(footer, sort_keys=True).encode()
    file.write(encoded)
    file.write(_U64.pack(len(encoded)))
    file.write(MAGIC)
    return footer["num_rows"]


def write_table_file(file: BinaryIO, table: DynamicEmbeddingTable, *, optim: bool) -> int:
    """Write ``table`` (with its optimizer state if ``optim``, and its admission counter) to the
    open binary ``file``, reading its rows batch by batch; returns rows written."""
    cached_rows = _cached_rows(table)
    counters = table.counter.dump() if table.counter is not None else ()
    return _write_chunks(file, table.export(), counters, _footer_fields(table), cached_rows, optim)


@dataclass(frozen=True)
class TableSnapshot:
    """A copy in host memory of everything :func:`write_table_file` reads from a table, taken at
    one moment, so the file can be written later (by another thread) while the table trains on."""

    rows: list[RowBatch]
    counters: list[CounterBatch]
    fields: dict[str, Any]
    cached_rows: int

    @classmethod
    def take(cls, table: DynamicEmbeddingTable) -> TableSnapshot:
        cached_rows = _cached_rows(table)
        rows = [tuple(t.detach().cpu().clone() for t in batch) for batch in table.export()]
        counters = []
        if table.counter is not None:
            counters = [(k.detach().cpu().clone(), c.detach().cpu().clone()) for k, c in table.counter.dump()]
        return cls(rows, counters, _footer_fields(table), cached_rows)  # type: ignore[arg-type]

    def write(self, file: BinaryIO, *, optim: bool) -> int:
        """Write the snapshot as :func:`write_table_file` writes the table; returns rows written."""
        return _write_chunks(file, self.rows, self.counters, self.fields, self.cached_rows, optim)


@dataclass(frozen=True)
class RowChunk:
    """Rows of a dump file: ``keys [n]``, ``scores [n]``, ``embeddings [n, dim]``,
    ``optimizer_state [n, state_dim]`` (``None`` when the file has none); ``cached``: they were in
    the device cache when dumped."""

    keys: torch.Tensor
    scores: torch.Tensor
    embeddings: torch.Tensor
    optimizer_state: torch.Tensor | None
    cached: bool


@dataclass
class TableFile:
    """A dump file opened for reading: its footer is parsed and its size checked on construction."""

    path: str
    footer: dict[str, Any]

    @classmethod
    def open(cls, path: str) -> TableFile:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such dump file")
        size = os.path.getsize(path)
        tail = 8 + len(MAGIC)
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
            if head != MAGIC:
                raise DynamicEmbFileError(path, "not a dynamicemb dump file (bad magic at the start)")
            if size < len(MAGIC) + tail:
                raise DynamicEmbFileError(path, f"truncated: {size} bytes is shorter than the fixed header and trailer")
            f.seek(size - tail)
            (footer_len,) = _U64.unpack(f.read(8))
            if f.read(len(MAGIC)) != MAGIC:
                raise DynamicEmbFileError(path, "truncated or corrupt: the trailing magic is missing")
            if footer_len > size - len(MAGIC) - tail:
                raise DynamicEmbFileError(path, f"corrupt: footer length {footer_len} exceeds the file size {size}")
            f.seek(size - tail - footer_len)
            raw = f.read(footer_len)
        try:
            footer = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DynamicEmbFileError(path, f"corrupt footer JSON ({error})") from None
        table_file = cls(path, footer)
        table_file._check_footer(size - tail - footer_len - len(MAGIC))
        return table_file

    def _check_footer(self, data_bytes: int) -> None:
        required = ("format_version", "table", "dim", "dtype", "num_rows", "chunk_rows", "has_optimizer_state",
                    "optimizer_state_dim", "optimizer", "optimizer_step", "score_clock", "crc32")  # fmt: skip
        missing = [key for key in required if key not in self.footer]
        if missing:
            raise DynamicEmbFileError(self.path, f"footer lacks {missing}")
        if self.footer["format_version"] not in _READABLE_VERSIONS:
            raise DynamicEmbFileError(
                self.path,
                f"format_version {self.footer['format_version']}, this reader knows {list(_READABLE_VERSIONS)}",
            )
        if self.footer["dtype"] not in _DTYPES:
            raise DynamicEmbFileError(self.path, f"unknown dtype {self.footer['dtype']!r}")
        if sum(self.footer["chunk_rows"]) != self.footer["num_rows"]:
            raise DynamicEmbFileError(self.path, "corrupt footer: chunk_rows do not add up to num_rows")
        counter_rows = self.footer.get("counter_chunk_rows", [])
        if not isinstance(counter_rows, list) or not all(isinstance(m, int) and m >= 0 for m in counter_rows):
            raise DynamicEmbFileError(self.path, f"corrupt footer: counter_chunk_rows {counter_rows!r}")
        cached_rows = self.footer.get("cached_rows", 0)
        if not isinstance(cached_rows, int) or not 0 <= cached_rows <= self.footer["num_rows"]:
            raise DynamicEmbFileError(
                self.path, f"corrupt footer: cached_rows {cached_rows!r} is not in [0, {self.footer['num_rows']}]"
            )
        expected = self.data_bytes
        if expected != data_bytes:
            raise DynamicEmbFileError(
                self.path, f"truncated or corrupt: {data_bytes} data bytes, the footer describes {expected}"
            )

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.footer["dtype"]]

    @property
    def state_dim(self) -> int:
        return self.footer["optimizer_state_dim"] if self.footer["has_optimizer_state"] else 0

    @property
    def row_bytes(self) -> int:
        return 16 + (self.footer["dim"] + self.state_dim) * self.dtype.itemsize

    @property
    def cached_rows(self) -> int:
        """Leading rows that were in the device cache (0 in version-1 files)."""
        return self.footer.get("cached_rows", 0)

    @property
    def counter_chunk_rows(self) -> list[int]:
        """Keys of each admission-counter chunk (none in version-1 files)."""
        return list(self.footer.get("counter_chunk_rows", []))

    @property
    def data_bytes(self) -> int:
        """Bytes between the leading magic and the footer: row chunks, then counter chunks."""
        return self.footer["num_rows"] * self.row_bytes + sum(self.counter_chunk_rows) * _COUNTER_ROW_BYTES

    def check_matches(self, table: DynamicEmbeddingTable, *, optim: bool) -> None:
        """Raise :class:`DynamicEmbFileError` naming the mismatch if the file cannot load into ``table``."""
        footer = self.footer
        if footer["table"] != table.name:
            raise DynamicEmbFileError(self.path, f"holds table {footer['table']!r}, not {table.name!r}")
        if footer["dim"] != table.dim:
            raise DynamicEmbFileError(
                self.path, f"embedding dim {footer['dim']} in the file, {table.dim} in table {table.name!r}"
            )
        if self.dtype != table.dtype:
            raise DynamicEmbFileError(self.path, f"dtype {footer['dtype']} in the file, {table.dtype} in the table")
        if not optim:
            return
        if not footer["has_optimizer_state"]:
            raise DynamicEmbFileError(
                self.path, "has no optimizer state (dumped with optim=False); load with optim=False"
            )
        file_optimizer = footer["optimizer"].get("optimizer")
        table_optimizer = table.optimizer.args.optimizer.name
        if file_optimizer != table_optimizer or footer["optimizer_state_dim"] != table.optimizer.state_dim:
            raise DynamicEmbFileError(
                self.path,
                f"optimizer state of {file_optimizer} ({footer['optimizer_state_dim']} columns), "
                f"table {table.name!r} uses {table_optimizer} ({table.optimizer.state_dim} columns)",
            )

    def verify_checksum(self) -> None:
        crc = 0
        remaining = self.data_bytes
        with open(self.path, "rb") as f:
            f.seek(len(MAGIC))
            while remaining:
                block = f.read(min(remaining, _READ_BLOCK))
                if not block:
                    raise DynamicEmbFileError(self.path, "truncated while verifying the checksum")
                crc = zlib.crc32(block, crc)
                remaining -= len(block)
        if crc != self.footer["crc32"]:
            raise DynamicEmbFileError(
                self.path, f"corrupt: checksum {crc:#010x}, the footer says {self.footer['crc32']:#010x}"
            )

    def rows(self) -> Iterator[RowChunk]:
        """The rows, chunk by chunk; a chunk is split where the cached rows end."""
        dim, state_dim, dtype = self.footer["dim"], self.state_dim, self.dtype
        cached_left = self.cached_rows
        with open(self.path, "rb") as f:
            f.seek(len(MAGIC))
            for n in self.footer["chunk_rows"]:
                keys = self._read(f, n * 8).view(torch.int64)
                scores = self._read(f, n * 8).view(torch.int64)
                embeddings = self._read(f, n * dim * dtype.itemsize).view(dtype).view(n, dim)
                state = None
                if state_dim:
                    state = self._read(f, n * state_dim * dtype.itemsize).view(dtype).view(n, state_dim)
                cut = min(cached_left, n)
                cached_left -= cut
                for part, cached in ((slice(0, cut), True), (slice(cut, n), False)):
                    if part.stop > part.start:
                        yield RowChunk(
                            keys[part], scores[part], embeddings[part], None if state is None else state[part], cached
                        )

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """``(keys [n], scores [n], embeddings [n, dim], optimizer_state [n, state_dim] or None)`` per chunk."""
        for chunk in self.rows():
            yield chunk.keys, chunk.scores, chunk.embeddings, chunk.optimizer_state

    def counters(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The admission counter, chunk by chunk: ``(keys [m] int64, counts [m] int64)``."""
        with open(self.path, "rb") as f:
            f.seek(len(MAGIC) + self.footer["num_rows"] * self.row_bytes)
            for m in self.counter_chunk_rows:
                keys = self._read(f, m * 8).view(torch.int64)
                counts = self._read(f, m * 8).view(torch.int64)
                yield keys, counts

    def _read(self, f: BinaryIO, nbytes: int) -> torch.Tensor:
        data = f.read(nbytes)
        if len(data) != nbytes:
            raise DynamicEmbFileError(self.path, "truncated while reading rows")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
