"""Batches of user sequences for generative recommenders: `RankingBatch` and `RetrievalBatch`.

Token layout contract (what every dataset produces and every model consumes)
---------------------------------------------------------------------------
All features live in one TorchRec `KeyedJaggedTensor` (`batch.features`) with `stride == batch_size`.
For user ``b``:

* **Contextual features** (`contextual_feature_names`, e.g. user id, age): each is a jagged feature with
  ``>= 0`` ids per user (usually exactly 1). They describe the user, not a position in the sequence.
* **Item feature** (`item_feature_name`): ``n_b`` ids in time order (oldest first). The first
  ``n_b - c_b`` ids are the user's *history*; the LAST ``c_b = num_candidates[b]`` ids are the
  *candidates* to score. ``num_candidates is None`` means ``c_b = 0`` for everyone (no candidates).
* **Action feature** (`action_feature_name`, optional): exactly ``n_b`` ids, aligned one to one with the
  item feature (``action[i]`` is what the user did with ``item[i]``). The action id is the bitmask of the
  task labels, ``sum_t label[t] << t`` (task 0 is bit 0). At candidate positions the action IS the label
  (the quantity to predict), so a model must never feed candidate actions as input tokens.
* **Timestamp feature** (`timestamp_feature_name`, optional): exactly ``n_b`` int64 Unix seconds aligned
  with the item feature, non-decreasing per user. It is data, not an embedding id: do not look it up.
* Any other feature that shares the item's `FeatureConfig` is a per-item side feature (e.g. category id)
  aligned with the item feature.

A model that interleaves tokens therefore builds, per user:
``[ctx_0 .. ctx_{k-1}, item_0, action_0, ..., item_{h-1}, action_{h-1}, cand_0, ..., cand_{c-1}]``
with ``h = n_b - c_b`` (history items paired with their actions, candidates appended as items only).

Labels
------
`RankingBatch.labels` is a float32 tensor ``[num_label_rows, num_tasks]`` of 0/1 values. Its rows follow the
order "user 0's scored items, then user 1's, ...", and within a user the item order. The scored items are
the candidates when `num_candidates` is given (``num_label_rows == num_candidates.sum()``), else every item
(``num_label_rows == item lengths.sum()``). ``labels[r, t] == (action >> t) & 1`` at the same item whenever
an action feature is present.

`RetrievalBatch` has no label tensor: without candidates every item is the target of the position before
it (next-item prediction); with candidates (evaluation, e.g. leave-last-out with ``max_num_candidates=1``)
the candidate items are held-out targets that must be predicted from the history alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from gr_models.data.host_view import HostCopy

__all__ = ["Batch", "FeatureConfig", "RankingBatch", "RetrievalBatch"]

_BatchT = TypeVar("_BatchT", bound="Batch")

_RANDOM_TIMESTAMP_START = 1_600_000_000
_RANDOM_TIMESTAMP_MAX_GAP = 86_400


@dataclass
class FeatureConfig:
    """Features that share one length per user (e.g. an item id sequence and its aligned action sequence).

    Args:
        feature_names: names of the features in this group; all have the same length per user.
        max_item_ids: one per feature: ids are drawn from ``[0, max_item_ids[i])`` (the vocabulary size).
        max_sequence_length: the largest number of ids one user has in each feature of this group. For the
            item group it bounds history + candidates together.
        is_jagged: True: lengths vary per user in ``[1, max_sequence_length]``; False: every user has
            exactly ``max_sequence_length`` ids.
    """

    feature_names: list[str]
    max_item_ids: list[int]
    max_sequence_length: int
    is_jagged: bool = True

    def __post_init__(self) -> None:
        if len(self.feature_names) != len(self.max_item_ids):
            raise ValueError(
                f"FeatureConfig: {len(self.feature_names)} feature_names but {len(self.max_item_ids)} max_item_ids"
            )
        if not self.feature_names:
            raise ValueError("FeatureConfig: feature_names is empty")
        if self.max_sequence_length < 1:
            raise ValueError(f"FeatureConfig {self.feature_names}: max_sequence_length must be >= 1")
        for name, vocab in zip(self.feature_names, self.max_item_ids):
            if vocab < 1:
                raise ValueError(f"FeatureConfig: max_item_ids for {name!r} must be >= 1, got {vocab}")


@dataclass
class Batch(Pipelineable):
    """Common fields of ranking and retrieval batches (see the module docstring for the token layout).

    Attributes:
        features: KJT with every feature (contextual, item, action, side features, timestamps),
            ``stride() == batch_size``; values int64.
        batch_size: number of users B.
        feature_to_max_seqlen: for each KJT key, an upper bound of its per-user length.
        contextual_feature_names: contextual keys, in the order their tokens come first.
        item_feature_name: key of the item id sequence (history followed by candidates).
        action_feature_name: key of the action sequence aligned with the items, or None.
        max_num_candidates: upper bound of ``num_candidates`` (0 when there are no candidates).
        num_candidates: int64 ``[B]``, candidates at the end of each user's item sequence, or None.
        timestamp_feature_name: key of the per-item Unix-second timestamps, or None.
        host: set by `to()`: the host tensors a batch moved to a device came from (read it through
            `host_copy()`, which checks that it still describes `features`).
    """

    features: KeyedJaggedTensor
    batch_size: int
    feature_to_max_seqlen: dict[str, int]
    contextual_feature_names: list[str] = field(default_factory=list)
    item_feature_name: str = "item"
    action_feature_name: str | None = None
    max_num_candidates: int = 0
    num_candidates: torch.Tensor | None = None
    timestamp_feature_name: str | None = None
    host: HostCopy | None = field(default=None, kw_only=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        key_list = self.features.keys()
        keys = set(key_list)
        named = [*self.contextual_feature_names, self.item_feature_name]
        named += [n for n in (self.action_feature_name, self.timestamp_feature_name) if n is not None]
        missing = [n for n in named if n not in keys]
        if missing:
            raise ValueError(f"{type(self).__name__}: features {missing} are not keys of the KJT {sorted(keys)}")
        unbounded = [k for k in key_list if k not in self.feature_to_max_seqlen]
        if unbounded:
            raise ValueError(f"{type(self).__name__}: feature_to_max_seqlen lacks {unbounded}")
        if self.num_candidates is not None and tuple(self.num_candidates.shape) != (self.batch_size,):
            raise ValueError(
                f"{type(self).__name__}: num_candidates must have shape [{self.batch_size}], "
                f"got {tuple(self.num_candidates.shape)}"
            )
        if self.num_candidates is not None and self.max_num_candidates < 1:
            raise ValueError(f"{type(self).__name__}: num_candidates is given but max_num_candidates < 1")

    def feature_lengths(self, name: str) -> torch.Tensor:
        """Per-user lengths ``[B]`` (int) of one KJT key."""
        return self.features[name].lengths()

    def item_lengths(self) -> torch.Tensor:
        """``[B]`` item-sequence lengths (history + candidates)."""
        return self.feature_lengths(self.item_feature_name)

    def history_lengths(self) -> torch.Tensor:
        """``[B]`` history lengths: item lengths minus candidates."""
        lengths = self.item_lengths()
        if self.num_candidates is None:
            return lengths
        return lengths - self.num_candidates.to(lengths.dtype)

    def _tensor_fields(self) -> dict[str, torch.Tensor]:
        return {"num_candidates": self.num_candidates} if self.num_candidates is not None else {}

    def _map(
        self: _BatchT,
        fn_kjt: Callable[[KeyedJaggedTensor], KeyedJaggedTensor],
        fn_tensor: Callable[[torch.Tensor], torch.Tensor],
    ) -> _BatchT:
        updates: dict[str, Any] = {name: fn_tensor(t) for name, t in self._tensor_fields().items()}
        return dataclasses.replace(self, features=fn_kjt(self.features), **updates)

    def host_copy(self) -> HostCopy | None:
        """The batch's features and candidate counts on the host: the batch itself when it is on the host, else the
        tensors it was moved from by `to()`; None for a batch built on a device (or whose features were replaced)."""
        if self.features.device().type == "cpu":
            if self.num_candidates is not None and self.num_candidates.device.type != "cpu":
                return None
            return HostCopy(self.features, self.num_candidates, describes=self.features)
        if self.host is not None and self.host.describes is self.features:
            return self.host
        return None

    def to(self: _BatchT, device: torch.device | str, non_blocking: bool = False) -> _BatchT:
        """A copy of the batch on ``device`` (every tensor, KJT included) that keeps its host copy (`host_copy()`)."""
        device = torch.device(device)
        host = self.host_copy()
        moved = self._map(
            lambda kjt: kjt.to(device=device, non_blocking=non_blocking),
            lambda t: t.to(device=device, non_blocking=non_blocking),
        )
        if host is not None:
            moved.host = dataclasses.replace(host, describes=moved.features)
        return moved

    def pin_memory(self: _BatchT) -> _BatchT:
        """A copy with every host tensor in page-locked memory (needs an accelerator build of torch)."""
        return self._map(lambda kjt: kjt.pin_memory(), lambda t: t.pin_memory())

    def record_stream(self, stream: torch.Stream) -> None:
        """Mark every tensor as used by ``stream`` (TorchRec train pipelines call this)."""
        self.features.record_stream(stream)
        for t in self._tensor_fields().values():
            t.record_stream(stream)

    @staticmethod
    def _random_features(
        batch_size: int,
        feature_configs: list[FeatureConfig],
        item_feature_name: str,
        contextual_feature_names: list[str],
        action_feature_name: str | None,
        max_num_candidates: int,
        timestamp_feature_name: str | None,
        generator: torch.Generator | None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, int], torch.Tensor | None]:
        """Random CPU values/lengths per key, the max lengths, and num_candidates (None if no candidates)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_num_candidates < 0:
            raise ValueError(f"max_num_candidates must be >= 0, got {max_num_candidates}")
        owner = {}
        for config in feature_configs:
            for name in config.feature_names:
                if name in owner:
                    raise ValueError(f"feature {name!r} appears in more than one FeatureConfig")
                owner[name] = config
        if item_feature_name not in owner:
            raise ValueError(f"item feature {item_feature_name!r} is in no FeatureConfig")
        item_config = owner[item_feature_name]
        if action_feature_name is not None and action_feature_name not in item_config.feature_names:
            raise ValueError(
                f"action feature {action_feature_name!r} must be in the same FeatureConfig as the item feature "
                f"{item_feature_name!r} so that their lengths match"
            )
        for name in contextual_feature_names:
            if name not in owner:
                raise ValueError(f"contextual feature {name!r} is in no FeatureConfig")
            if owner[name] is item_config:
                raise ValueError(f"contextual feature {name!r} cannot share the item feature's FeatureConfig")
        stray = [n for n in owner if owner[n] is not item_config and n not in contextual_feature_names]
        if stray:
            raise ValueError(f"features {stray} are neither contextual nor in the item feature's FeatureConfig")
        if timestamp_feature_name is not None and timestamp_feature_name in owner:
            raise ValueError(f"timestamp feature {timestamp_feature_name!r} must not be in a FeatureConfig")
        if max_num_candidates >= item_config.max_sequence_length:
            raise ValueError(
                f"max_num_candidates ({max_num_candidates}) must be smaller than the item max_sequence_length "
                f"({item_config.max_sequence_length}) so that every user keeps at least one history item"
            )

        def randint(low: int, high: int, size: tuple[int, ...]) -> torch.Tensor:
            return torch.randint(low, high, size, generator=generator, dtype=torch.int64)

        num_candidates = None
        if max_num_candidates > 0:
            num_candidates = randint(1, max_num_candidates + 1, (batch_size,))
        values: dict[str, torch.Tensor] = {}
        lengths: dict[str, torch.Tensor] = {}
        max_seqlen: dict[str, int] = {}
        for config in feature_configs:
            max_len = config.max_sequence_length
            if config is item_config and num_candidates is not None:
                if config.is_jagged:
                    history = (torch.rand(batch_size, generator=generator) * (max_len - num_candidates)).long() + 1
                    group_lengths = history + num_candidates
                else:
                    group_lengths = torch.full((batch_size,), max_len, dtype=torch.int64)
            elif config.is_jagged:
                group_lengths = randint(1, max_len + 1, (batch_size,))
            else:
                group_lengths = torch.full((batch_size,), max_len, dtype=torch.int64)
            total = int(group_lengths.sum())
            for name, vocab in zip(config.feature_names, config.max_item_ids):
                values[name] = randint(0, vocab, (total,))
                lengths[name] = group_lengths
                max_seqlen[name] = max_len
        if timestamp_feature_name is not None:
            item_lengths = lengths[item_feature_name]
            gaps = randint(0, _RANDOM_TIMESTAMP_MAX_GAP, (int(item_lengths.sum()),))
            running = torch.cumsum(gaps, 0)
            starts = torch.cumsum(item_lengths, 0) - item_lengths
            before_user = torch.where(starts > 0, running[(starts - 1).clamp(min=0)], torch.zeros_like(starts))
            user_start = randint(_RANDOM_TIMESTAMP_START, _RANDOM_TIMESTAMP_START + 10**7, (batch_size,))
            values[timestamp_feature_name] = running - torch.repeat_interleave(before_user - user_start, item_lengths)
            lengths[timestamp_feature_name] = item_lengths
            max_seqlen[timestamp_feature_name] = max_seqlen[item_feature_name]
        return values, lengths, max_seqlen, num_candidates

    @staticmethod
    def _candidate_mask(item_lengths: torch.Tensor, num_candidates: torch.Tensor | None) -> torch.Tensor:
        """Bool ``[sum(item_lengths)]``: True at candidate positions (every position if no candidates)."""
        total = int(item_lengths.sum())
        if num_candidates is None:
            return torch.ones(total, dtype=torch.bool, device=item_lengths.device)
        ends = torch.cumsum(item_lengths, 0)
        position_end = torch.repeat_interleave(ends, item_lengths)
        remaining = position_end - torch.arange(total, device=item_lengths.device)
        return remaining <= torch.repeat_interleave(num_candidates.to(item_lengths.dtype), item_lengths)

    @staticmethod
    def _assemble_kjt(values: dict[str, torch.Tensor], lengths: dict[str, torch.Tensor]) -> KeyedJaggedTensor:
        keys = list(values)
        return KeyedJaggedTensor.from_lengths_sync(
            keys=keys,
            values=torch.cat([values[k] for k in keys]),
            lengths=torch.cat([lengths[k] for k in keys]).to(torch.int64),
        )


@dataclass
class RankingBatch(Batch):
    """A ranking batch: features plus 0/1 labels per scored item and task.

    Attributes:
        labels: float32 ``[num_label_rows, num_tasks]``; rows are the candidates (when `num_candidates` is
            given) or every item, user by user in item order (see the module docstring). None for unlabeled
            (inference) batches.
    """

    labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.labels is not None and self.labels.dim() != 2:
            raise ValueError(f"RankingBatch.labels must be 2-D [rows, num_tasks], got shape {tuple(self.labels.shape)}")

    def _tensor_fields(self) -> dict[str, torch.Tensor]:
        fields = super()._tensor_fields()
        if self.labels is not None:
            fields["labels"] = self.labels
        return fields

    @classmethod
    def random(
        cls,
        batch_size: int,
        feature_configs: list[FeatureConfig],
        item_feature_name: str,
        contextual_feature_names: list[str] | None = None,
        action_feature_name: str | None = None,
        max_num_candidates: int = 0,
        device: torch.device | str = "cpu",
        num_tasks: int = 1,
        *,
        timestamp_feature_name: str | None = None,
        generator: torch.Generator | None = None,
    ) -> RankingBatch:
        """A random batch that obeys the layout contract (labels uniform 0/1, actions at candidates = labels).

        Every user gets ``1..max_num_candidates`` candidates (when ``max_num_candidates > 0``) and at least one
        history item; jagged lengths are uniform. The action vocabulary must hold ``2**num_tasks`` ids.
        """
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        contextual = list(contextual_feature_names or [])
        values, lengths, max_seqlen, num_candidates = cls._random_features(
            batch_size,
            feature_configs,
            item_feature_name,
            contextual,
            action_feature_name,
            max_num_candidates,
            timestamp_feature_name,
            generator,
        )
        is_scored = cls._candidate_mask(lengths[item_feature_name], num_candidates)
        labels = torch.randint(0, 2, (int(is_scored.sum()), num_tasks), generator=generator, dtype=torch.int64)
        if action_feature_name is not None:
            action_vocab = next(
                v for c in feature_configs for n, v in zip(c.feature_names, c.max_item_ids) if n == action_feature_name
            )
            if action_vocab < 2**num_tasks:
                raise ValueError(
                    f"action feature {action_feature_name!r} has {action_vocab} ids but {num_tasks} tasks need "
                    f"2**{num_tasks} = {2**num_tasks} (actions are label bitmasks)"
                )
            bitmask = (labels << torch.arange(num_tasks)).sum(dim=1)
            values[action_feature_name] = values[action_feature_name].masked_scatter(is_scored, bitmask)
        batch = cls(
            features=cls._assemble_kjt(values, lengths),
            batch_size=batch_size,
            feature_to_max_seqlen=max_seqlen,
            contextual_feature_names=contextual,
            item_feature_name=item_feature_name,
            action_feature_name=action_feature_name,
            max_num_candidates=max_num_candidates,
            num_candidates=num_candidates,
            timestamp_feature_name=timestamp_feature_name,
            labels=labels.to(torch.float32),
        )
        return batch.to(device)


@dataclass
class RetrievalBatch(Batch):
    """A retrieval batch: next-item prediction over the item sequence (no label tensor).

    Without candidates every item ``i >= 1`` is the target of position ``i - 1``; with candidates (evaluation)
    the last ``num_candidates[b]`` items of user ``b`` are held-out targets predicted from the history.
    """

    @classmethod
    def random(
        cls,
        batch_size: int,
        feature_configs: list[FeatureConfig],
        item_feature_name: str,
        contextual_feature_names: list[str] | None = None,
        action_feature_name: str | None = None,
        max_num_candidates: int = 0,
        device: torch.device | str = "cpu",
        *,
        timestamp_feature_name: str | None = None,
        generator: torch.Generator | None = None,
    ) -> RetrievalBatch:
        """A random batch that obeys the layout contract (uniform ids and lengths)."""
        contextual = list(contextual_feature_names or [])
        values, lengths, max_seqlen, num_candidates = cls._random_features(
            batch_size,
            feature_configs,
            item_feature_name,
            contextual,
            action_feature_name,
            max_num_candidates,
            timestamp_feature_name,
            generator,
        )
        batch = cls(
            features=cls._assemble_kjt(values, lengths),
            batch_size=batch_size,
            feature_to_max_seqlen=max_seqlen,
            contextual_feature_names=contextual,
            item_feature_name=item_feature_name,
            action_feature_name=action_feature_name,
            max_num_candidates=max_num_candidates,
            num_candidates=num_candidates,
            timestamp_feature_name=timestamp_feature_name,
        )
        return batch.to(device)
