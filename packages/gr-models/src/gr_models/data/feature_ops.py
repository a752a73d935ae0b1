"""Per-column feature operations applied when a table is loaded: truncation, murmur hashing, vocabulary checks,
and log-bucketing of timestamps. Each op maps a `JaggedColumn` (one row per user) to a new one.

Ops run in the order given, e.g. ``(HashIds(1 << 20),)`` for string ids going to a static table of 2**20 rows,
``(HashIds(0),)`` for a dynamic table (any non-negative int64 key), ``(CheckVocab(3953),)`` for raw ids of a
static table, ``(Truncate(50, side="left"),)`` to keep a list's last 50 values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from gr_models.data.hashing import hash_int64, hash_strings, to_key_space
from gr_models.data.jagged import JaggedColumn
from gr_models.data.validation import OutOfVocabPolicy, check_ids

__all__ = ["BucketizeTimestamps", "CheckVocab", "FeatureOp", "HashIds", "Truncate", "apply_feature_ops"]


class FeatureOp(Protocol):
    def apply(self, column: JaggedColumn, *, name: str, source: str | None) -> JaggedColumn:
        """The transformed column; bad data raises `DataValidationError` naming ``source``, the row and ``name``."""
        ...

    def output_vocab_size(self, previous: int | None) -> int | None:
        """Vocabulary after this op, given the one before it (None: unknown)."""
        ...


@dataclass(frozen=True)
class Truncate:
    """Keep at most ``max_length`` values per row: ``side="left"`` cuts the oldest (first) values, ``"right"``
    the newest (last)."""

    max_length: int
    side: Literal["left", "right"] = "left"

    def __post_init__(self) -> None:
        if self.max_length < 0:
            raise ValueError(f"Truncate.max_length must be >= 0, got {self.max_length}")
        if self.side not in ("left", "right"):
            raise ValueError(f"Truncate.side must be 'left' or 'right', got {self.side!r}")

    def apply(self, column: JaggedColumn, *, name: str, source: str | None) -> JaggedColumn:
        position = column.positions_in_row()
        if self.side == "right":
            return column.keep(position < self.max_length)
        return column.keep(position >= np.repeat(column.lengths - self.max_length, column.lengths))

    def output_vocab_size(self, previous: int | None) -> int | None:
        return previous


@dataclass(frozen=True)
class HashIds:
    """MurmurHash3 (x64_128, first half) of each id: int ids hash their 8 little-endian bytes, strings their
    UTF-8 bytes. ``num_buckets > 0`` maps into ``[0, num_buckets)`` (a static table); ``0`` keeps a
    non-negative int64 key (a dynamic table)."""

    num_buckets: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_buckets < 0:
            raise ValueError(f"HashIds.num_buckets must be >= 0, got {self.num_buckets}")

    def apply(self, column: JaggedColumn, *, name: str, source: str | None) -> JaggedColumn:
        values = column.values
        if values.dtype.kind in "iu":
            hashes = hash_int64(values.astype(np.int64), self.seed)
        else:
            hashes = hash_strings([str(v) if not isinstance(v, bytes) else v for v in values], self.seed)
        return column.with_values(to_key_space(hashes, self.num_buckets))

    def output_vocab_size(self, previous: int | None) -> int | None:
        return self.num_buckets


@dataclass(frozen=True)
class CheckVocab:
    """Require ids in ``[0, vocab_size)`` (a static table); ``on_out_of_vocab="clip"`` maps larger ids to
    ``vocab_size - 1`` instead of raising."""

    vocab_size: int
    on_out_of_vocab: OutOfVocabPolicy = "error"

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"CheckVocab.vocab_size must be >= 1, got {self.vocab_size}")

    def apply(self, column: JaggedColumn, *, name: str, source: str | None) -> JaggedColumn:
        return check_ids(
            column, column=name, vocab_size=self.vocab_size, on_out_of_vocab=self.on_out_of_vocab, source=source
        )

    def output_vocab_size(self, previous: int | None) -> int | None:
        return self.vocab_size


@dataclass(frozen=True)
class BucketizeTimestamps:
    """Replace each timestamp by a log bucket of its age relative to the row's latest timestamp:
    ``min(num_buckets - 1, floor(log(1 + age / unit_seconds) / log(base)))``, an id in ``[0, num_buckets)``."""

    num_buckets: int = 64
    base: float = 2.0
    unit_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.num_buckets < 1 or self.base <= 1.0 or self.unit_seconds <= 0:
            raise ValueError("BucketizeTimestamps needs num_buckets >= 1, base > 1 and unit_seconds > 0")

    def apply(self, column: JaggedColumn, *, name: str, source: str | None) -> JaggedColumn:
        values = column.values.astype(np.int64)
        if len(values) == 0:
            return column.with_values(values)
        lengths = column.lengths
        nonempty = lengths > 0
        latest = np.zeros(column.num_rows, dtype=np.int64)
        latest[nonempty] = np.maximum.reduceat(values, column.offsets[:-1][nonempty])
        age = (np.repeat(latest, lengths) - values).astype(np.float64) / self.unit_seconds
        buckets = np.floor(np.log1p(age) / np.log(self.base)).astype(np.int64)
        return column.with_values(np.clip(buckets, 0, self.num_buckets - 1))

    def output_vocab_size(self, previous: int | None) -> int | None:
        return self.num_buckets


def apply_feature_ops(
    column: JaggedColumn, ops: Sequence[FeatureOp], *, name: str, source: str | None = None
) -> tuple[JaggedColumn, int | None]:
    """Run ``ops`` in order; return the column and its vocabulary size (None when no op fixes one)."""
    vocab: int | None = None
    for op in ops:
        column = op.apply(column, name=name, source=source)
        vocab = op.output_vocab_size(vocab)
    return column, vocab
