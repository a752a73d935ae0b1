"""MovieLens-1M / -20M as next-item retrieval or rating-threshold ranking data.

Files: ML-1M ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``), optional ``users.dat``
(``UserID::Gender::Age::Occupation::Zip-code``) and ``movies.dat`` (``MovieID::Title::Genres``, latin-1);
ML-20M ``ratings.csv`` (``userId,movieId,rating,timestamp``) and optional ``movies.csv``. ``.gz`` copies of the
ratings file are read as well.

Each user's ratings, in time order, are the events: ratings with the same timestamp keep their order in the file
(``tie_order="file"``) or are ordered by movie id (``tie_order="item"``); on ML-1M (users 1-2999) the two orders
give 27% of the users a different last item (38% a different second-to-last). ``exclude_last_events=n`` drops each
user's ``n`` most recent ratings before the split (a leave-last-out split of what remains is then a validation
split). The item is the movie id, the action is the bitmask of ``rating >= threshold`` over ``rating_thresholds``
(task ``t`` = threshold ``t``), the timestamp is the rating time. Contextual features: ``user_id`` and, for ML-1M
with ``users.dat``, ``gender``, ``age``, ``occupation``, ``zip_code`` (ids from sorted distinct values; 0 marks a
user missing from ``users.dat``). Item side feature (``item_features=["genres"]``, ML-1M with ``movies.dat``):
``genres``, the movie's genre set (its ``Genres`` field, e.g. ``Animation|Children's|Comedy``) as one id per event
(ids from sorted distinct sets; 0 marks a movie missing from ``movies.dat``).
Splits follow `WindowPolicy`: leave-last-out by default (train on all but the last rating, evaluate the last).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from gr_models.data.dataset import InMemorySequenceDataset, UserSequences, group_events_by_user
from gr_models.data.encoding import categorical_ids, lookup_by_key
from gr_models.data.errors import DataValidationError
from gr_models.data.jagged import JaggedColumn
from gr_models.data.sample import Split, TruncateSide, WindowPolicy
from gr_models.data.schema import DatasetSchema, TaskKind
from gr_models.data.text_files import column_as_numpy, read_delimited
from gr_models.data.validation import check_ids

__all__ = ["MovieLensDataset"]

Variant = Literal["1m", "20m"]
TieOrder = Literal["file", "item"]
_ML1M_USER_FEATURES = ("gender", "age", "occupation", "zip_code")
_ML1M_ITEM_FEATURES = ("genres",)


def _find_ratings(root: Path, variant: Variant) -> Path:
    names = ("ratings.dat", "ratings.dat.gz") if variant == "1m" else ("ratings.csv", "ratings.csv.gz")
    for name in names:
        if (root / name).is_file():
            return root / name
    partial = sorted(str(p) for p in root.glob("partial/*")) if root.is_dir() else []
    hint = f"; files under partial/: {partial} (pass one as ratings_path, relative to the folder)" if partial else ""
    raise FileNotFoundError(f"no {' or '.join(names)} in {root}{hint}")


def _drop_last_events(
    user_keys: np.ndarray, offsets: np.ndarray, grouped: dict[str, np.ndarray], count: int
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Remove each user's last `count` events (users left with none are removed too)."""
    lengths = np.diff(offsets)
    kept_lengths = np.maximum(lengths - count, 0)
    position = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    keep = position < np.repeat(kept_lengths, lengths)
    has_events = kept_lengths > 0
    new_offsets = np.concatenate([[0], np.cumsum(kept_lengths[has_events])]).astype(np.int64)
    return user_keys[has_events], new_offsets, {name: values[keep] for name, values in grouped.items()}


class MovieLensDataset(InMemorySequenceDataset):
    """MovieLens user histories for retrieval or ranking (see the module docstring).

    Args:
        root: directory of the MovieLens files.
        variant: "1m" or "20m" (file formats).
        kind: "retrieval" or "ranking".
        split, holdout, max_train_candidates, truncate_side, max_sequence_length: see `WindowPolicy`.
        ratings_path: ratings file to use instead of the one in ``root`` (a relative path is taken relative to
            ``root``).
        rating_thresholds: task ``t`` is ``rating >= rating_thresholds[t]``.
        with_actions: include the action feature (always on for ranking).
        with_timestamps: include the ``timestamp`` feature.
        user_features: ML-1M ``users.dat`` columns to use as contextual features (default: all four when the file
            exists); ``user_id`` comes first.
        with_user_id: include the ``user_id`` contextual feature (the HSTU paper's sequential retrieval runs
            use none: ``with_user_id=False, user_features=[]``).
        tie_order: order of one user's ratings with the same timestamp: "file" or "item" (by movie id).
        exclude_last_events: drop each user's last ``n`` ratings (in that order) before splitting.
        item_features: ML-1M ``movies.dat`` fields to use as per-event item side features: ``["genres"]`` or none.

    Feature names: ``user_id`` (+ user features), ``item_id``, ``action``, ``genres`` (with item_features),
    ``timestamp``. ``catalogue_ids``: the
    sorted movie ids of the movies file and the ratings (the items a full-corpus ranking ranks).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        variant: Variant = "1m",
        kind: TaskKind = "retrieval",
        split: Split = "train",
        max_sequence_length: int = 200,
        holdout: int = 1,
        max_train_candidates: int = 0,
        truncate_side: TruncateSide = "left",
        ratings_path: str | Path | None = None,
        rating_thresholds: Sequence[float] = (4.0,),
        with_actions: bool = False,
        with_timestamps: bool = True,
        user_features: Sequence[str] | None = None,
        with_user_id: bool = True,
        tie_order: TieOrder = "file",
        exclude_last_events: int = 0,
        item_features: Sequence[str] = (),
    ):
        if variant not in ("1m", "20m"):
            raise ValueError(f"variant must be '1m' or '20m', got {variant!r}")
        root = Path(root)
        ratings_file = root / ratings_path if ratings_path is not None else _find_ratings(root, variant)
        self.ratings_path = ratings_file
        with_actions = with_actions or kind == "ranking"
        if tie_order not in ("file", "item"):
            raise ValueError(f"tie_order must be 'file' or 'item', got {tie_order!r}")
        if exclude_last_events < 0:
            raise ValueError(f"exclude_last_events must be >= 0, got {exclude_last_events}")
        self.tie_order = tie_order
        users, items, ratings, timestamps = self._read_ratings(ratings_file, variant)
        if tie_order == "item":  # ties keep the order they are given in: give them in movie-id order
            by_item = np.argsort(items, kind="stable")
            users, items, ratings, timestamps = users[by_item], items[by_item], ratings[by_item], timestamps[by_item]
        user_keys, offsets, grouped = group_events_by_user(users, timestamps, {"item_id": items, "rating": ratings})
        if exclude_last_events:
            user_keys, offsets, grouped = _drop_last_events(user_keys, offsets, grouped, exclude_last_events)

        sequence = {"item_id": grouped["item_id"]}
        self.catalogue_ids = self._catalogue(root, variant, items)
        vocab_sizes = {"item_id": int(self.catalogue_ids.max()) + 1 if len(self.catalogue_ids) else 1}
        task_names: tuple[str, ...] = ()
        if with_actions:
            thresholds = list(rating_thresholds)
            if not thresholds:
                raise ValueError("rating_thresholds is empty")
            action = np.zeros(len(grouped["rating"]), dtype=np.int64)
            for task, threshold in enumerate(thresholds):
                action |= (grouped["rating"] >= threshold).astype(np.int64) << task
            sequence["action"] = action
            vocab_sizes["action"] = 2 ** len(thresholds)
            task_names = tuple(f"rating>={threshold:g}" for threshold in thresholds)
        for name, (ids, vocab) in self._item_features(root, variant, item_features, grouped["item_id"]).items():
            sequence[name] = ids
            vocab_sizes[name] = vocab
        if with_timestamps:
            sequence["timestamp"] = grouped["__timestamps__"]

        contextual = {}
        if with_user_id:
            contextual["user_id"] = JaggedColumn.from_scalars(user_keys)
            vocab_sizes["user_id"] = int(user_keys.max()) + 1 if len(user_keys) else 1
        for name, (ids, vocab) in self._user_features(root, variant, user_features, user_keys).items():
            contextual[name] = JaggedColumn.from_scalars(ids)
            vocab_sizes[name] = vocab
        schema = DatasetSchema(
            kind=kind,
            item_feature_name="item_id",
            contextual_feature_names=tuple(contextual),
            contextual_max_lengths=dict.fromkeys(contextual, 1),
            action_feature_name="action" if with_actions else None,
            side_feature_names=tuple(item_features),
            timestamp_feature_name="timestamp" if with_timestamps else None,
            vocab_sizes=vocab_sizes,
            max_sequence_length=max_sequence_length,
            task_names=task_names,
        )
        policy = WindowPolicy(kind, split, max_sequence_length, holdout, max_train_candidates, truncate_side)
        super().__init__(UserSequences(offsets, sequence, contextual), schema, policy)

    @staticmethod
    def _read_ratings(path: Path, variant: Variant) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        names = ["user", "item", "rating", "timestamp"]
        types = {"user": pa.int64(), "item": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()}
        if variant == "1m":
            table = read_delimited(path, names, separator="::", column_types=types)
        else:
            header_names = ["userId", "movieId", "rating", "timestamp"]
            header_types = dict(zip(header_names, types.values()))
            table = read_delimited(path, header_names, header=True, column_types=header_types)
            table = table.rename_columns(names)
        source = str(path)
        users, items, ratings, timestamps = (column_as_numpy(table, n, source=source) for n in names)
        check_ids(JaggedColumn.from_scalars(users), column="user", source=source)
        check_ids(JaggedColumn.from_scalars(items), column="item", source=source)
        bad = np.flatnonzero((ratings < 0.5) | (ratings > 5.0))
        if bad.size:
            row = int(bad[0])
            raise DataValidationError(
                f"rating {ratings[row]} outside [0.5, 5]", source=source, row=row, column="rating"
            )
        return users, items, ratings, timestamps

    @staticmethod
    def _catalogue(root: Path, variant: Variant, items: np.ndarray) -> np.ndarray:
        """Sorted distinct movie ids of the movies file and the ratings (the ratings alone without the file)."""
        ids = np.zeros(0, dtype=np.int64)
        movies = root / ("movies.dat" if variant == "1m" else "movies.csv")
        if movies.is_file():
            if variant == "1m":
                table = read_delimited(
                    movies,
                    ["item", "title", "genres"],
                    separator="::",
                    include_columns=["item"],
                    column_types={"item": pa.int64()},
                )
                ids = column_as_numpy(table, "item", source=str(movies))
            else:
                table = read_delimited(movies, ["movieId"], header=True, column_types={"movieId": pa.int64()})
                ids = column_as_numpy(table, "movieId", source=str(movies))
        return np.union1d(ids.astype(np.int64), items.astype(np.int64))

    @staticmethod
    def _item_features(
        root: Path, variant: Variant, requested: Sequence[str], items: np.ndarray
    ) -> dict[str, tuple[np.ndarray, int]]:
        """Per-event ids of the requested ``movies.dat`` features (see the module docstring)."""
        unknown = [n for n in requested if n not in _ML1M_ITEM_FEATURES]
        if unknown:
            raise ValueError(f"unknown item features {unknown}; ML-1M has {list(_ML1M_ITEM_FEATURES)}")
        if not requested:
            return {}
        movies = root / "movies.dat"
        if variant != "1m" or not movies.is_file():
            raise FileNotFoundError(f"item features {list(requested)} need {movies} (ML-1M only)")
        table = read_delimited(
            movies, ["item", "title", "genres"], separator="::",
            column_types={"item": pa.int64(), "title": pa.string(), "genres": pa.string()},
        )  # fmt: skip
        source = str(movies)
        keys = column_as_numpy(table, "item", source=source)
        ids, vocab = categorical_ids(column_as_numpy(table, "genres", source=source).astype(str))
        return {"genres": (lookup_by_key(items, keys, ids), vocab)}

    @staticmethod
    def _user_features(
        root: Path, variant: Variant, requested: Sequence[str] | None, user_keys: np.ndarray
    ) -> dict[str, tuple[np.ndarray, int]]:
        users_file = root / "users.dat"
        available = variant == "1m" and users_file.is_file()
        names = list(_ML1M_USER_FEATURES if (requested is None and available) else (requested or ()))
        unknown = [n for n in names if n not in _ML1M_USER_FEATURES]
        if unknown:
            raise ValueError(f"unknown user features {unknown}; ML-1M has {list(_ML1M_USER_FEATURES)}")
        if not names:
            return {}
        if not available:
            raise FileNotFoundError(f"user features {names} need {users_file} (ML-1M only)")
        columns = ["user", *_ML1M_USER_FEATURES]
        table = read_delimited(
            users_file,
            columns,
            separator="::",
            column_types={**dict.fromkeys(columns, pa.string()), "user": pa.int64()},
        )
        source = str(users_file)
        keys = column_as_numpy(table, "user", source=source)
        features = {}
        for name in names:
            ids, vocab = categorical_ids(column_as_numpy(table, name, source=source).astype(str))
            features[name] = (lookup_by_key(user_keys, keys, ids), vocab)
        return features
