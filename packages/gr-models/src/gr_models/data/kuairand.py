"""KuaiRand (Kuaishou short-video logs) as multi-task ranking data.

Log files (``log_standard_*.csv``, ``log_random_*.csv``; ``.gz`` copies work) have a header with at least
``user_id, video_id, time_ms`` and the task columns (0/1): by default ``is_click, long_view, is_like, is_follow``
(others: ``is_comment, is_forward, is_hate, is_profile_enter``). The optional ``user_features_*.csv`` (header
with ``user_id`` and categorical columns such as ``user_active_degree``, ``follow_user_num_range``) supplies
contextual features (ids from sorted distinct values; 0 marks a user missing from that file).

Events are one user's log rows in ``time_ms`` order (ties keep file order, files in the order given); the item is
``video_id`` (optionally murmur-hashed, e.g. into a dynamic table's key space), the action is the bitmask of the
task columns (task ``t`` = bit ``t``), the timestamp is ``time_ms // 1000``. Splits follow `WindowPolicy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from gr_models.data.dataset import InMemorySequenceDataset, UserSequences, group_events_by_user
from gr_models.data.encoding import categorical_ids, lookup_by_key
from gr_models.data.errors import DataValidationError
from gr_models.data.feature_ops import HashIds
from gr_models.data.jagged import JaggedColumn
from gr_models.data.sample import Split, TruncateSide, WindowPolicy
from gr_models.data.schema import DatasetSchema, TaskKind
from gr_models.data.text_files import column_as_numpy, read_delimited
from gr_models.data.validation import check_ids

__all__ = ["KUAIRAND_DEFAULT_TASKS", "KUAIRAND_DEFAULT_USER_FEATURES", "KuaiRandDataset"]

KUAIRAND_DEFAULT_TASKS = ("is_click", "long_view", "is_like", "is_follow")
KUAIRAND_DEFAULT_USER_FEATURES = (
    "user_active_degree",
    "is_lowactive_period",
    "is_live_streamer",
    "is_video_author",
    "follow_user_num_range",
    "fans_user_num_range",
    "friend_user_num_range",
    "register_days_range",
)


class KuaiRandDataset(InMemorySequenceDataset):
    """KuaiRand user histories (see the module docstring).

    Args:
        log_paths: one or more log CSV files (rows of all files are pooled).
        user_features_path: the user features CSV, or None for ``user_id`` as the only contextual feature.
        kind: "ranking" (default) or "retrieval".
        task_columns: 0/1 log columns that become the tasks, in bit order.
        user_feature_columns: categorical columns of the user features file to use.
        item_hash_buckets: None keeps raw ``video_id``s (vocabulary = max id + 1); an int hashes them with
            `HashIds` (0 = any non-negative int64 key, for a dynamic table).
        split, holdout, max_train_candidates, truncate_side, max_sequence_length: see `WindowPolicy`.

    Feature names: ``user_id`` (+ user features), ``item_id``, ``action``, ``timestamp``.
    """

    def __init__(
        self,
        log_paths: str | Path | Sequence[str | Path],
        *,
        user_features_path: str | Path | None = None,
        kind: TaskKind = "ranking",
        split: Split = "train",
        max_sequence_length: int = 256,
        holdout: int = 1,
        max_train_candidates: int = 0,
        truncate_side: TruncateSide = "left",
        task_columns: Sequence[str] = KUAIRAND_DEFAULT_TASKS,
        user_feature_columns: Sequence[str] = KUAIRAND_DEFAULT_USER_FEATURES,
        item_hash_buckets: int | None = None,
    ):
        paths = [Path(log_paths)] if isinstance(log_paths, (str, Path)) else [Path(p) for p in log_paths]
        if not paths:
            raise ValueError("log_paths is empty")
        tasks = list(task_columns)
        if not tasks:
            raise ValueError("task_columns is empty")
        users, items, times_ms, actions = self._read_logs(paths, tasks)
        user_keys, offsets, grouped = group_events_by_user(users, times_ms, {"item_id": items, "action": actions})

        item_ids = grouped["item_id"]
        if item_hash_buckets is None:
            item_vocab = int(item_ids.max()) + 1 if len(item_ids) else 1
        else:
            hashed = HashIds(item_hash_buckets).apply(JaggedColumn.from_scalars(item_ids), name="video_id", source=None)
            item_ids, item_vocab = hashed.values, item_hash_buckets
        sequence = {"item_id": item_ids, "action": grouped["action"], "timestamp": grouped["__timestamps__"] // 1000}
        contextual = {"user_id": JaggedColumn.from_scalars(user_keys)}
        vocab_sizes = {
            "user_id": int(user_keys.max()) + 1 if len(user_keys) else 1,
            "item_id": item_vocab,
            "action": 2 ** len(tasks),
        }
        if user_features_path is not None:
            for name, (ids, vocab) in self._user_features(Path(user_features_path), user_feature_columns, user_keys):
                contextual[name] = JaggedColumn.from_scalars(ids)
                vocab_sizes[name] = vocab
        schema = DatasetSchema(
            kind=kind,
            item_feature_name="item_id",
            contextual_feature_names=tuple(contextual),
            contextual_max_lengths=dict.fromkeys(contextual, 1),
            action_feature_name="action",
            timestamp_feature_name="timestamp",
            vocab_sizes=vocab_sizes,
            max_sequence_length=max_sequence_length,
            task_names=tuple(tasks),
        )
        policy = WindowPolicy(kind, split, max_sequence_length, holdout, max_train_candidates, truncate_side)
        super().__init__(UserSequences(offsets, sequence, contextual), schema, policy)

    @staticmethod
    def _read_logs(paths: list[Path], tasks: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        columns = ["user_id", "video_id", "time_ms", *tasks]
        parts: dict[str, list[np.ndarray]] = {name: [] for name in columns}
        for path in paths:
            table = read_delimited(path, columns, header=True, column_types=dict.fromkeys(columns, pa.int64()))
            source = str(path)
            for name in columns:
                values = column_as_numpy(table, name, source=source)
                if name in tasks:
                    bad = np.flatnonzero((values != 0) & (values != 1))
                    if bad.size:
                        raise DataValidationError(
                            f"task label {int(values[bad[0]])} is not 0 or 1",
                            source=source,
                            row=int(bad[0]),
                            column=name,
                        )
                elif name != "time_ms":
                    check_ids(JaggedColumn.from_scalars(values), column=name, source=source)
                parts[name].append(values)
        merged = {name: np.concatenate(chunks) for name, chunks in parts.items()}
        actions = np.zeros(len(merged["user_id"]), dtype=np.int64)
        for task, name in enumerate(tasks):
            actions |= merged[name].astype(np.int64) << task
        return merged["user_id"], merged["video_id"], merged["time_ms"], actions

    @staticmethod
    def _user_features(
        path: Path, names: Sequence[str], user_keys: np.ndarray
    ) -> list[tuple[str, tuple[np.ndarray, int]]]:
        columns = ["user_id", *names]
        table = read_delimited(
            path, columns, header=True, column_types={**dict.fromkeys(names, pa.string()), "user_id": pa.int64()}
        )
        source = str(path)
        keys = column_as_numpy(table, "user_id", source=source)
        features = []
        for name in names:
            ids, vocab = categorical_ids(column_as_numpy(table, name, source=source).astype(str))
            features.append((name, (lookup_by_key(user_keys, keys, ids), vocab)))
        return features
