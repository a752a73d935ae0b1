"""Map-style datasets of user sequences: index -> one user's `SequenceSample`.

`SequenceDataset` turns each user's full, time-ordered event history into one sample through a `WindowPolicy`
(leave-last-out split, candidates, truncation). `InMemorySequenceDataset` serves users from `UserSequences`,
columnar arrays in memory, which the MovieLens, KuaiRand and Parquet/ORC readers fill.
"""

from __future__ import annotations

import copy
import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch.utils.data

from gr_models.data.jagged import JaggedColumn
from gr_models.data.sample import SequenceSample, Split, WindowPolicy
from gr_models.data.schema import DatasetSchema

__all__ = ["InMemorySequenceDataset", "SequenceDataset", "UserSequences", "group_events_by_user"]


class SequenceDataset(torch.utils.data.Dataset, ABC):
    """One sample per user who has enough events for the policy (others are skipped and counted).

    Subclasses provide the users' event counts and their full event histories (`user_events`). Samples are a
    pure function of the index, so any number of loader workers and ranks see the same data.

    Attributes:
        schema: the features of the samples; ``schema.max_num_candidates`` follows the policy's split.
        policy: how a user's events become a sample.
    """

    def __init__(self, schema: DatasetSchema, policy: WindowPolicy, num_events: np.ndarray):
        if policy.kind != schema.kind:
            raise ValueError(f"policy is for {policy.kind} but the schema for {schema.kind}")
        self._num_events = np.asarray(num_events, dtype=np.int64)
        self._apply_policy(schema, policy)

    def _apply_policy(self, schema: DatasetSchema, policy: WindowPolicy) -> None:
        self.policy = policy
        self.schema = dataclasses.replace(
            schema, max_num_candidates=policy.max_num_candidates, max_sequence_length=policy.max_sequence_length
        )
        self._users = np.flatnonzero(self._num_events >= policy.minimum_events)

    @property
    def num_skipped_users(self) -> int:
        """Users with fewer events than ``policy.minimum_events``."""
        return len(self._num_events) - len(self._users)

    def with_split(self, split: Split) -> SequenceDataset:
        """The same users and data under another split (shares the underlying arrays)."""
        other = copy.copy(self)
        other._apply_policy(self.schema, dataclasses.replace(self.policy, split=split))
        return other

    def __len__(self) -> int:
        return len(self._users)

    def __getitem__(self, index: int) -> SequenceSample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} users")
        contextual, sequence = self.user_events(int(self._users[index]))
        window = self.policy.window(len(sequence[self.schema.item_feature_name]))
        return SequenceSample(
            contextual=contextual,
            sequence={name: window.take(values) for name, values in sequence.items()},
            num_candidates=window.num_candidates,
        )

    def sample_lengths(self, indices: np.ndarray) -> np.ndarray:
        """int64 ``[len(indices)]``: events (history + candidates) in the samples at ``indices``, without reading
        them (e.g. to balance sequence lengths across ranks)."""
        lengths = []
        for events in self._num_events[self._users[np.asarray(indices, dtype=np.int64)]]:
            window = self.policy.window(int(events))
            lengths.append(window.history_end - window.history_start + window.num_candidates)
        return np.asarray(lengths, dtype=np.int64)

    @abstractmethod
    def user_events(self, user: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The full history of stored user ``user``: (contextual ids by name, event-aligned arrays by name)."""


@dataclass
class UserSequences:
    """Users' full event histories, columnar, in memory.

    Attributes:
        offsets: int64 ``[U + 1]``: user ``u``'s events are ``[offsets[u], offsets[u + 1])``, oldest first.
        sequence: sequence feature name -> ``[offsets[-1]]`` int64 values aligned with the events.
        contextual: contextual feature name -> per-user ids (``JaggedColumn`` with U rows).
    """

    offsets: np.ndarray
    sequence: dict[str, np.ndarray]
    contextual: dict[str, JaggedColumn]

    def __post_init__(self) -> None:
        total = int(self.offsets[-1])
        for name, values in self.sequence.items():
            if len(values) != total:
                raise ValueError(f"sequence feature {name!r} has {len(values)} values for {total} events")
        for name, column in self.contextual.items():
            if column.num_rows != self.num_users:
                raise ValueError(f"contextual feature {name!r} has {column.num_rows} rows for {self.num_users} users")

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_events(self) -> np.ndarray:
        return np.diff(self.offsets)


def group_events_by_user(
    user_keys: np.ndarray, timestamps: np.ndarray, columns: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Group a long event log (one row per event) by user, each user's events in time order.

    Ties in time keep their order in the log. Returns ``(users, offsets, grouped)``: the distinct user keys
    (ascending), int64 ``[U + 1]`` offsets, and every column (``timestamps`` included under the key
    ``"__timestamps__"``) reordered to match.
    """
    order = np.lexsort((np.arange(len(user_keys)), timestamps, user_keys))
    sorted_users = user_keys[order]
    is_first = np.concatenate([[True], sorted_users[1:] != sorted_users[:-1]]) if len(order) else np.zeros(0, bool)
    offsets = np.append(np.flatnonzero(is_first), len(order)).astype(np.int64)
    grouped = {name: values[order] for name, values in columns.items()}
    grouped["__timestamps__"] = timestamps[order]
    return sorted_users[offsets[:-1]], offsets, grouped


class InMemorySequenceDataset(SequenceDataset):
    """A `SequenceDataset` over `UserSequences` (every key of ``users.sequence`` and ``users.contextual`` must
    be in the schema)."""

    def __init__(self, users: UserSequences, schema: DatasetSchema, policy: WindowPolicy):
        expected_sequence = set(schema.sequence_feature_names)
        if set(users.sequence) != expected_sequence:
            raise ValueError(
                f"sequence features {sorted(users.sequence)} differ from the schema's {sorted(expected_sequence)}"
            )
        if set(users.contextual) != set(schema.contextual_feature_names):
            raise ValueError(
                f"contextual features {sorted(users.contextual)} differ from the schema's "
                f"{sorted(schema.contextual_feature_names)}"
            )
        self.users = users
        super().__init__(schema, policy, users.num_events)

    def user_events(self, user: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        start, end = self.users.offsets[user], self.users.offsets[user + 1]
        contextual = {name: column.row(user) for name, column in self.users.contextual.items()}
        return contextual, {name: values[start:end] for name, values in self.users.sequence.items()}
