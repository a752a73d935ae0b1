"""What a dataset produces: feature names, vocabularies, length bounds and tasks (`DatasetSchema`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from gr_models.data.batch import FeatureConfig

__all__ = ["UNBOUNDED_VOCAB", "DatasetSchema", "TaskKind"]

TaskKind = Literal["ranking", "retrieval"]

UNBOUNDED_VOCAB = 0
"""Vocabulary size of a feature hashed into the whole non-negative int64 key space (for dynamic tables)."""

_FEATURE_CONFIG_MAX_ID = (1 << 63) - 1


@dataclass(frozen=True)
class DatasetSchema:
    """The features of the batches a dataset yields (see `gr_models.data.batch` for the token layout).

    Attributes:
        kind: "ranking" (batches are `RankingBatch`) or "retrieval" (`RetrievalBatch`).
        item_feature_name: KJT key of the item ids (history then candidates).
        contextual_feature_names: KJT keys of the per-user contextual ids, in token order.
        action_feature_name: KJT key of the actions (label bitmasks) aligned with the items, or None.
        side_feature_names: KJT keys of further per-item ids aligned with the items (e.g. a genre).
        timestamp_feature_name: KJT key of the per-item Unix-second timestamps (not an embedding id), or None.
        vocab_sizes: number of distinct ids of every id feature: ids lie in ``[0, vocab)``;
            `UNBOUNDED_VOCAB` (0) means any non-negative int64 (hashed keys for a dynamic table).
        max_sequence_length: bound of the item sequence length (history + candidates) per user.
        contextual_max_lengths: bound of each contextual feature's length per user.
        max_num_candidates: bound of candidates per user; 0 means batches carry no candidates.
        task_names: ranking task names; task ``t`` is bit ``t`` of the action id. Empty for retrieval
            batches without actions.
    """

    kind: TaskKind
    item_feature_name: str
    vocab_sizes: Mapping[str, int]
    max_sequence_length: int
    contextual_feature_names: tuple[str, ...] = ()
    contextual_max_lengths: Mapping[str, int] = field(default_factory=dict)
    action_feature_name: str | None = None
    side_feature_names: tuple[str, ...] = ()
    timestamp_feature_name: str | None = None
    max_num_candidates: int = 0
    task_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("ranking", "retrieval"):
            raise ValueError(f"kind must be 'ranking' or 'retrieval', got {self.kind!r}")
        if self.kind == "ranking" and (self.action_feature_name is None or not self.task_names):
            raise ValueError("a ranking schema needs an action feature and at least one task (labels are action bits)")
        missing = [n for n in self.id_feature_names if n not in self.vocab_sizes]
        if missing:
            raise ValueError(f"vocab_sizes lacks {missing}")
        missing = [n for n in self.contextual_feature_names if n not in self.contextual_max_lengths]
        if missing:
            raise ValueError(f"contextual_max_lengths lacks {missing}")
        if self.max_num_candidates < 0 or self.max_num_candidates >= self.max_sequence_length:
            raise ValueError(
                f"max_num_candidates ({self.max_num_candidates}) must lie in [0, max_sequence_length "
                f"({self.max_sequence_length}))"
            )

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def sequence_feature_names(self) -> tuple[str, ...]:
        """Keys aligned with the items, in KJT order: item, action, side features, timestamp."""
        names = [self.item_feature_name]
        if self.action_feature_name is not None:
            names.append(self.action_feature_name)
        names += self.side_feature_names
        if self.timestamp_feature_name is not None:
            names.append(self.timestamp_feature_name)
        return tuple(names)

    @property
    def id_feature_names(self) -> tuple[str, ...]:
        """Every key that is an embedding id (all but the timestamp), in KJT order."""
        return tuple(n for n in self.feature_names if n != self.timestamp_feature_name)

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Every KJT key in order: contextual features, then the sequence features."""
        return (*self.contextual_feature_names, *self.sequence_feature_names)

    def feature_to_max_seqlen(self) -> dict[str, int]:
        bounds = {name: self.contextual_max_lengths[name] for name in self.contextual_feature_names}
        bounds.update({name: self.max_sequence_length for name in self.sequence_feature_names})
        return bounds

    def feature_configs(self) -> list[FeatureConfig]:
        """`FeatureConfig`s equivalent to this schema (e.g. for `RankingBatch.random`); the timestamp is left
        out (pass ``timestamp_feature_name`` to `.random` instead). Unbounded vocabularies become 2**63 - 1."""

        def vocab(name: str) -> int:
            size = self.vocab_sizes[name]
            return size if size != UNBOUNDED_VOCAB else _FEATURE_CONFIG_MAX_ID

        configs = [
            FeatureConfig([name], [vocab(name)], self.contextual_max_lengths[name], True)
            for name in self.contextual_feature_names
        ]
        item_group = [n for n in self.sequence_feature_names if n != self.timestamp_feature_name]
        configs.append(FeatureConfig(item_group, [vocab(n) for n in item_group], self.max_sequence_length, True))
        return configs
