"""Any Parquet or ORC table of user sequences (one row per user), read with pyarrow, with per-column feature ops.

Columns: the item column and every other sequence column (action, label columns, timestamp, side features) are
list columns of equal length per row, in time order; contextual columns are lists or scalars. Each feature is a
`FeatureColumn` (source column, KJT key, feature ops such as `HashIds`, `CheckVocab`, `Truncate`,
`BucketizeTimestamps`).

Checks, each failing with `DataValidationError` naming the file, the row (0-based within the file) and the
column: a null list or value; sequence columns of a row with different lengths (before and after the ops);
timestamps that decrease within a row (or, with ``on_unsorted="sort"``, rows are stably sorted by time);
negative ids; ids beyond a `CheckVocab` vocabulary (or clipped, as that op says); string ids never hashed; task
labels other than 0/1; actions beyond ``2**num_tasks``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gr_models.data.dataset import InMemorySequenceDataset, UserSequences
from gr_models.data.errors import DataValidationError, check_readable_file
from gr_models.data.feature_ops import FeatureOp, apply_feature_ops
from gr_models.data.jagged import JaggedColumn
from gr_models.data.sample import Split, TruncateSide, WindowPolicy
from gr_models.data.schema import DatasetSchema, TaskKind
from gr_models.data.validation import OutOfOrderPolicy, check_aligned, check_ids, check_time_order, sort_rows_by_time

__all__ = ["FeatureColumn", "SequenceTableDataset", "read_table"]

FileFormat = Literal["parquet", "orc"]
_ACTION_KEY = "action"


@dataclass(frozen=True)
class FeatureColumn:
    """One feature read from a table column.

    Attributes:
        column: the table column.
        name: the KJT key (default: the column name).
        ops: feature ops applied in order when the table is loaded.
    """

    column: str
    name: str | None = None
    ops: tuple[FeatureOp, ...] = field(default_factory=tuple)

    @property
    def key(self) -> str:
        return self.name or self.column


def _as_feature(spec: FeatureColumn | str) -> FeatureColumn:
    return spec if isinstance(spec, FeatureColumn) else FeatureColumn(spec)


def read_table(path: Path, columns: Sequence[str], file_format: FileFormat | None = None) -> pa.Table:
    """Read ``columns`` of a Parquet (``.parquet``/``.pq``) or ORC (``.orc``) file. A missing or unreadable file
    (absent, not readable, not of that format, corrupt) and a missing column raise `DataValidationError` naming
    the file (and the column)."""
    fmt = file_format or {".parquet": "parquet", ".pq": "parquet", ".orc": "orc"}.get(path.suffix.lower())
    if fmt not in ("parquet", "orc"):
        raise ValueError(f"cannot tell the format of {path}: pass file_format='parquet' or 'orc'")
    check_readable_file(path)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            available = pq.read_schema(path).names
            reader = pq.read_table
        else:
            import pyarrow.orc as orc

            available = orc.ORCFile(path).schema.names
            reader = orc.read_table
        for column in columns:
            if column not in available:
                raise DataValidationError(f"no such column (columns: {available})", source=str(path), column=column)
        return reader(path, columns=list(columns))
    except (pa.ArrowException, OSError) as error:
        kind = "Parquet" if fmt == "parquet" else "ORC"
        problem = " ".join(str(error).split())
        raise DataValidationError(
            f"cannot be read as {kind} ({type(error).__name__}: {problem})", source=str(path)
        ) from None


def _to_jagged(table: pa.Table, column: str, source: str) -> JaggedColumn:
    """A list or scalar column as a `JaggedColumn` (a null raises, naming the row)."""
    array = table.column(column).combine_chunks()
    if array.null_count:
        row = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataValidationError("null row", source=source, row=row, column=column)
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        offsets = array.offsets.to_numpy().astype(np.int64)
        values = array.flatten()
        offsets = offsets - offsets[0]
    else:
        values, offsets = array, np.arange(len(array) + 1, dtype=np.int64)
    if values.null_count:
        position = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        row = int(np.searchsorted(offsets, position, side="right") - 1)
        raise DataValidationError("null value inside the row", source=source, row=row, column=column)
    if pa.types.is_timestamp(values.type):
        values = pc.cast(pc.cast(values, pa.timestamp("s")), pa.int64())
    elif pa.types.is_floating(values.type):
        raise DataValidationError(f"values of type {values.type} are not ids", source=source, column=column)
    return JaggedColumn(values.to_numpy(zero_copy_only=False), offsets)


def _value_type(table: pa.Table, column: str) -> pa.DataType:
    """The type of a column's values (of its list elements for a list column)."""
    kind = table.schema.field(column).type
    return kind.value_type if pa.types.is_list(kind) or pa.types.is_large_list(kind) else kind


def _finish_ids(column: JaggedColumn, key: str, source: str) -> JaggedColumn:
    if column.values.dtype.kind not in "iu":
        raise DataValidationError(
            f"holds {column.values.dtype} values: add HashIds(...) to its ops to turn them into ids",
            source=source,
            column=key,
        )
    column = column.with_values(column.values.astype(np.int64))
    return check_ids(column, column=key, source=source)


class SequenceTableDataset(InMemorySequenceDataset):
    """User sequences from Parquet/ORC files (module docstring).

    Args:
        paths: one or more files; rows of all files are pooled, in order.
        item: the item id list column.
        kind: "retrieval" or "ranking".
        action: the action list column (label bitmasks); for ranking give it with ``task_names`` or give
            ``label_columns`` instead.
        label_columns: 0/1 list columns aligned with the items, one per task; the action becomes their bitmask.
        task_names: task names when the action column holds the bitmasks.
        timestamp_column: Unix-time list column (ints or Arrow timestamps), kept under its own name.
        side_features: further per-item list columns.
        contextual: per-user columns (lists or scalars).
        on_unsorted: "error" (default) or "sort" rows whose timestamps decrease.
        file_format: "parquet" or "orc" (default: from each file's suffix).
        split, holdout, max_train_candidates, truncate_side, max_sequence_length: see `WindowPolicy`.

    Vocabulary of a feature: set by its last `HashIds`/`CheckVocab`/`BucketizeTimestamps` op, else the largest id
    seen plus one.
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        *,
        item: FeatureColumn | str,
        kind: TaskKind = "retrieval",
        action: FeatureColumn | str | None = None,
        label_columns: Sequence[str] = (),
        task_names: Sequence[str] = (),
        timestamp_column: str | None = None,
        side_features: Sequence[FeatureColumn | str] = (),
        contextual: Sequence[FeatureColumn | str] = (),
        on_unsorted: OutOfOrderPolicy = "error",
        file_format: FileFormat | None = None,
        split: Split = "train",
        max_sequence_length: int = 200,
        holdout: int = 1,
        max_train_candidates: int = 0,
        truncate_side: TruncateSide = "left",
    ):
        files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        if not files:
            raise ValueError("paths is empty")
        if on_unsorted not in ("error", "sort"):
            raise ValueError(f"on_unsorted must be 'error' or 'sort', got {on_unsorted!r}")
        if action is not None and label_columns:
            raise ValueError("give either an action column or label_columns, not both")
        tasks = tuple(label_columns) or tuple(task_names)
        if kind == "ranking" and (not tasks or (action is None and not label_columns)):
            raise ValueError("ranking needs label_columns, or an action column together with task_names")
        self._item = _as_feature(item)
        self._action = _as_feature(action) if action is not None else None
        self._labels = list(label_columns)
        self._timestamp = timestamp_column
        self._side = [_as_feature(s) for s in side_features]
        self._contextual = [_as_feature(c) for c in contextual]
        self._num_tasks = len(tasks)
        self._on_unsorted = on_unsorted
        keys = [self._item.key, *(f.key for f in self._side), *(f.key for f in self._contextual)]
        if self._action is not None or self._labels:
            keys.append(_ACTION_KEY if self._labels else self._action.key)  # type: ignore[union-attr]
        if timestamp_column is not None:
            keys.append(timestamp_column)
        if len(set(keys)) != len(keys):
            raise ValueError(f"feature keys must be distinct, got {keys}")

        per_file = [self._load_file(path, file_format) for path in files]
        sequence, contextual_columns, vocab_sizes = self._merge(per_file)
        action_key = None
        if self._labels:
            action_key = _ACTION_KEY
        elif self._action is not None:
            action_key = self._action.key
        if action_key is not None and tasks:
            vocab_sizes[action_key] = 2**self._num_tasks
        schema = DatasetSchema(
            kind=kind,
            item_feature_name=self._item.key,
            contextual_feature_names=tuple(f.key for f in self._contextual),
            contextual_max_lengths={
                key: max(1, int(column.lengths.max()) if column.num_rows else 1)
                for key, column in contextual_columns.items()
            },
            action_feature_name=action_key,
            side_feature_names=tuple(f.key for f in self._side),
            timestamp_feature_name=timestamp_column,
            vocab_sizes=vocab_sizes,
            max_sequence_length=max_sequence_length,
            task_names=tasks,
        )
        offsets = per_file[0][0] if len(per_file) == 1 else _concat_offsets([p[0] for p in per_file])
        policy = WindowPolicy(kind, split, max_sequence_length, holdout, max_train_candidates, truncate_side)
        super().__init__(UserSequences(offsets, sequence, contextual_columns), schema, policy)

    def _load_file(
        self, path: Path, file_format: FileFormat | None
    ) -> tuple[np.ndarray, dict[str, JaggedColumn], dict[str, JaggedColumn], dict[str, int | None]]:
        """Offsets, sequence features, contextual features and op-defined vocabularies of one file."""
        source = str(path)
        sequence_specs = [self._item, *self._side]
        if self._action is not None:
            sequence_specs.append(self._action)
        needed = {f.column for f in [*sequence_specs, *self._contextual]} | set(self._labels)
        if self._timestamp is not None:
            needed.add(self._timestamp)
        table = read_table(path, sorted(needed), file_format)
        raw = {name: _to_jagged(table, name, source) for name in sorted(needed)}
        raw_sequence_columns = {f.column for f in sequence_specs} | set(self._labels)
        if self._timestamp is not None:
            raw_sequence_columns.add(self._timestamp)
        check_aligned({name: raw[name] for name in sorted(raw_sequence_columns)}, source=source)
        if self._timestamp is not None:
            timestamps = raw[self._timestamp]
            if self._on_unsorted == "sort":
                others = {n: raw[n] for n in raw_sequence_columns if n != self._timestamp}
                sorted_columns = sort_rows_by_time(timestamps, others)
                raw.update({n: c for n, c in sorted_columns.items() if n != "__timestamps__"})
                raw[self._timestamp] = sorted_columns["__timestamps__"]
            else:
                check_time_order(timestamps, column=self._timestamp, source=source)

        features: dict[str, JaggedColumn] = {}
        vocabs: dict[str, int | None] = {}
        for spec in [*sequence_specs, *self._contextual]:
            column, vocabs[spec.key] = apply_feature_ops(raw[spec.column], spec.ops, name=spec.key, source=source)
            features[spec.key] = _finish_ids(column, spec.key, source)
        if self._labels:
            action = np.zeros(len(raw[self._labels[0]].values), dtype=np.int64)
            for task, name in enumerate(self._labels):
                labels = raw[name]
                if labels.values.dtype.kind not in "iub":
                    raise DataValidationError(
                        f"label column holds {_value_type(table, name)} values; labels must be integers "
                        "(or booleans) 0 or 1",
                        source=source,
                        column=name,
                    )
                bad = np.flatnonzero((labels.values != 0) & (labels.values != 1))
                if bad.size:
                    raise DataValidationError(
                        f"label {labels.values[bad[0]]} is not 0 or 1",
                        source=source,
                        row=int(labels.row_of(bad[0])),
                        column=name,
                    )
                action |= labels.values.astype(np.int64) << task
            features[_ACTION_KEY] = raw[self._labels[0]].with_values(action)
        elif self._action is not None and self._num_tasks:
            actions = features[self._action.key]
            beyond = np.flatnonzero(actions.values >= 2**self._num_tasks)
            if beyond.size:
                raise DataValidationError(
                    f"action {int(actions.values[beyond[0]])} is not a bitmask of {self._num_tasks} tasks",
                    source=source,
                    row=int(actions.row_of(beyond[0])),
                    column=self._action.column,
                )
        if self._timestamp is not None:
            features[self._timestamp] = raw[self._timestamp].with_values(raw[self._timestamp].values.astype(np.int64))

        sequence_keys = [self._item.key, *(f.key for f in self._side)]
        sequence_keys += [k for k in (_ACTION_KEY if self._labels else None, self._timestamp) if k is not None]
        if self._action is not None:
            sequence_keys.append(self._action.key)
        lengths = check_aligned({key: features[key] for key in sequence_keys}, source=source)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        sequence = {key: features[key] for key in sequence_keys}
        contextual = {f.key: features[f.key] for f in self._contextual}
        return offsets, sequence, contextual, vocabs

    def _merge(self, per_file: list) -> tuple[dict[str, np.ndarray], dict[str, JaggedColumn], dict[str, int]]:
        sequence_keys = list(per_file[0][1])
        sequence = {key: np.concatenate([p[1][key].values for p in per_file]) for key in sequence_keys}
        contextual = {}
        for spec in self._contextual:
            columns = [p[2][spec.key] for p in per_file]
            contextual[spec.key] = JaggedColumn(
                np.concatenate([c.values for c in columns]), _concat_offsets([c.offsets for c in columns])
            )
        vocab_sizes: dict[str, int] = {}
        for key, values in [*sequence.items(), *((k, c.values) for k, c in contextual.items())]:
            if key == self._timestamp:
                continue
            defined = per_file[0][3].get(key)
            vocab_sizes[key] = defined if defined is not None else (int(values.max()) + 1 if len(values) else 1)
        return sequence, contextual, vocab_sizes


def _concat_offsets(offsets: list[np.ndarray]) -> np.ndarray:
    pieces, base = [np.zeros(1, dtype=np.int64)], 0
    for o in offsets:
        pieces.append(o[1:] + base)
        base += int(o[-1])
    return np.concatenate(pieces)
