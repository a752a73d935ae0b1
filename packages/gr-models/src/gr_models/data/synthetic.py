"""The embedded default data set: synthetic user histories with Zipf lengths and ids and a planted signal.

Generative story (all draws seeded by ``(seed, user)``, so a user's history never depends on workers or ranks):

* Items ``1..num_items`` are spread over ``num_clusters`` latent clusters by a fixed random permutation; within a
  cluster, item popularity is Zipf (exponent ``item_zipf_exponent``).
* A user has ``clusters_per_user`` preferred clusters and ``n`` events, ``n`` Zipf-distributed on
  ``[min_events, max_events]`` (exponent ``length_zipf_exponent``).
* Event ``i``'s cluster: with probability ``follow_previous`` the cluster of event ``i - 1``; else with
  probability ``preferred_share`` one of the preferred clusters; else a uniformly random cluster. Its item is a
  Zipf draw within that cluster.
* Task 0 ("click") is 1 with probability ``click_if_preferred`` when the item's cluster is preferred, else
  ``click_otherwise``. The preferred clusters are latent, but the history reveals them (most history items and
  most clicks fall in them), so a sequence model can learn "is this candidate's cluster frequent in the history".
* Task ``t >= 1`` is 1 only after a click, with probability ``quality_if_good`` when bit ``t`` of the item's
  hashed quality code is set, else ``quality_otherwise`` (an item-level signal an item embedding can learn).
* The action of an event is its label bitmask; timestamps grow by exponential gaps (mean ``mean_gap_seconds``).
* Contextual features: ``user_id`` (``user + 1``) and ``user_segment`` (the first preferred cluster modulo
  ``num_user_segments``, a weak hint).

For retrieval, ``follow_previous`` and the Zipf popularity make the next item predictable above chance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gr_models.data.dataset import SequenceDataset
from gr_models.data.hashing import hash_int64
from gr_models.data.sample import Split, TruncateSide, WindowPolicy
from gr_models.data.schema import DatasetSchema, TaskKind

__all__ = ["SyntheticConfig", "SyntheticDataset"]

_TIMESTAMP_START = 1_600_000_000


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and signal strengths of the synthetic data (see the module docstring)."""

    num_users: int = 4096
    num_items: int = 20_000
    num_clusters: int = 50
    clusters_per_user: int = 2
    min_events: int = 8
    max_events: int = 200
    length_zipf_exponent: float = 1.1
    item_zipf_exponent: float = 1.05
    follow_previous: float = 0.4
    preferred_share: float = 0.6
    click_if_preferred: float = 0.85
    click_otherwise: float = 0.1
    quality_if_good: float = 0.8
    quality_otherwise: float = 0.2
    num_tasks: int = 2
    num_user_segments: int = 8
    mean_gap_seconds: float = 3600.0
    with_timestamps: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_items < self.num_clusters:
            raise ValueError(f"num_items ({self.num_items}) must be >= num_clusters ({self.num_clusters})")
        if not 1 <= self.clusters_per_user <= self.num_clusters:
            raise ValueError(f"clusters_per_user must lie in [1, num_clusters], got {self.clusters_per_user}")
        if not 1 <= self.min_events <= self.max_events:
            raise ValueError(f"need 1 <= min_events <= max_events, got {self.min_events}, {self.max_events}")
        if self.num_tasks < 1 or self.num_users < 1:
            raise ValueError("num_tasks and num_users must be >= 1")


def _truncated_zipf_cdf(size: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, size + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


class SyntheticDataset(SequenceDataset):
    """Synthetic user histories (module docstring) served as ranking or retrieval samples.

    Args:
        config: generator settings.
        kind: "ranking" (labels are the planted tasks) or "retrieval".
        split, holdout, max_train_candidates, truncate_side: see `WindowPolicy`.
        max_sequence_length: bound of history + candidates per sample.

    Feature names: contextual ``user_id``, ``user_segment``; sequence ``item_id``, ``action``, ``timestamp``.
    """

    def __init__(
        self,
        config: SyntheticConfig | None = None,
        *,
        kind: TaskKind = "ranking",
        split: Split = "train",
        max_sequence_length: int = 200,
        holdout: int = 1,
        max_train_candidates: int = 0,
        truncate_side: TruncateSide = "left",
    ):
        self.config = config = config or SyntheticConfig()
        policy = WindowPolicy(kind, split, max_sequence_length, holdout, max_train_candidates, truncate_side)
        if config.min_events < policy.minimum_events:
            raise ValueError(
                f"min_events ({config.min_events}) is below the {policy.minimum_events} events this split needs"
            )
        items_per_cluster = config.num_items // config.num_clusters
        permutation = np.random.default_rng([config.seed, 1]).permutation(items_per_cluster * config.num_clusters)
        self._item_of_slot = permutation + 1
        self._slot_of_item = np.full(config.num_items + 1, -1, dtype=np.int64)
        self._slot_of_item[self._item_of_slot] = np.arange(len(permutation))
        self._items_per_cluster = items_per_cluster
        self._item_rank_cdf = _truncated_zipf_cdf(items_per_cluster, config.item_zipf_exponent)
        length_cdf = _truncated_zipf_cdf(config.max_events - config.min_events + 1, config.length_zipf_exponent)
        length_draws = np.random.default_rng([config.seed, 2]).random(config.num_users)
        num_events = config.min_events + np.searchsorted(length_cdf, length_draws, side="right")
        self._num_events_per_user = np.minimum(num_events, config.max_events)
        task_names = ("click", *(f"quality_{t}" for t in range(1, config.num_tasks)))
        if 2**config.num_tasks > np.iinfo(np.int64).max:
            raise ValueError(f"num_tasks {config.num_tasks} is too large for an int64 action bitmask")
        schema = DatasetSchema(
            kind=kind,
            item_feature_name="item_id",
            contextual_feature_names=("user_id", "user_segment"),
            contextual_max_lengths={"user_id": 1, "user_segment": 1},
            action_feature_name="action",
            timestamp_feature_name="timestamp" if config.with_timestamps else None,
            vocab_sizes={
                "user_id": config.num_users + 1,
                "user_segment": config.num_user_segments,
                "item_id": config.num_items + 1,
                "action": 2**config.num_tasks,
            },
            max_sequence_length=max_sequence_length,
            task_names=task_names,
        )
        super().__init__(schema, policy, self._num_events_per_user)

    def item_cluster(self, item_ids: np.ndarray) -> np.ndarray:
        """Latent cluster of each item id (``-1`` for ids that belong to no cluster)."""
        slots = self._slot_of_item[np.asarray(item_ids, dtype=np.int64)]
        return np.where(slots >= 0, slots % self.config.num_clusters, -1)

    def item_quality_bits(self, item_ids: np.ndarray) -> np.ndarray:
        """int64 quality code of each item; bit ``t`` drives task ``t >= 1``."""
        return (hash_int64(np.asarray(item_ids, dtype=np.int64), seed=self.config.seed) >> np.uint64(1)).astype(
            np.int64
        )

    def preferred_clusters(self, user: int) -> np.ndarray:
        """The latent preferred clusters of stored user ``user`` (for analysis and tests)."""
        return self._draw_preferences(np.random.default_rng([self.config.seed, 3, user]))

    def _draw_preferences(self, rng: np.random.Generator) -> np.ndarray:
        config = self.config
        return rng.choice(config.num_clusters, size=config.clusters_per_user, replace=False)

    def user_events(self, user: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        config = self.config
        n = int(self._num_events_per_user[user])
        preferred = self.preferred_clusters(user)
        rng = np.random.default_rng([config.seed, 4, user])
        mode = rng.random(n)
        follows = mode < config.follow_previous
        follows[0] = False
        from_preferred = mode < config.follow_previous + (1 - config.follow_previous) * config.preferred_share
        fresh_cluster = np.where(
            from_preferred,
            preferred[rng.integers(0, len(preferred), n)],
            rng.integers(0, config.num_clusters, n),
        )
        last_fresh = np.maximum.accumulate(np.where(follows, 0, np.arange(n)))
        clusters = fresh_cluster[last_fresh]
        ranks = np.searchsorted(self._item_rank_cdf, rng.random(n), side="right")
        items = self._item_of_slot[clusters + config.num_clusters * np.minimum(ranks, self._items_per_cluster - 1)]

        is_preferred = np.isin(clusters, preferred)
        click = rng.random(n) < np.where(is_preferred, config.click_if_preferred, config.click_otherwise)
        action = click.astype(np.int64)
        quality = self.item_quality_bits(items)
        for task in range(1, config.num_tasks):
            good = ((quality >> task) & 1).astype(bool)
            hit = rng.random(n) < np.where(good, config.quality_if_good, config.quality_otherwise)
            action |= (click & hit).astype(np.int64) << task

        sequence = {"item_id": items.astype(np.int64), "action": action}
        if config.with_timestamps:
            gaps = rng.exponential(config.mean_gap_seconds, n).astype(np.int64)
            sequence["timestamp"] = _TIMESTAMP_START + int(rng.integers(0, 10**7)) + np.cumsum(gaps)
        contextual = {
            "user_id": np.array([user + 1], dtype=np.int64),
            "user_segment": np.array([preferred[0] % config.num_user_segments], dtype=np.int64),
        }
        return contextual, sequence
