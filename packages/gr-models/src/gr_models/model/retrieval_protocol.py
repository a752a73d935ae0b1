"""The MovieLens next-item retrieval protocol: how ratings become training sequences and held-out targets, and how
a `RetrievalGR` (or `SASRec`) is scored on them.

- Events: every rating is a positive event, whatever its value. A user's ratings are in time order; ratings with
  the same timestamp are ordered as `tie_order` says ("file": as in the ratings file; "item": by movie id). The
  tie order changes 27% of the test items of ML-1M (users 1-2999), so every reported number names it.
- Splits (leave-last-out): the last rating of each user is the test target, its history every earlier rating.
  With `validation`, the second-to-last rating is the validation target (history: the ratings before it) and
  training sees neither; without it training sees every rating but the last (the HSTU paper's public code).
  Training is next-item prediction at every position of the training sequence.
- Length: a sample holds at most `max_sequence_length` events including the held-out target; older events are
  dropped.
- Ranking: every catalogue item (the movies file's ids and every rated id; other ids in `[0, vocab)` never) is
  scored for each user; with `filter_seen` the items of the user's history are left out, except the target, as the
  HSTU paper's code evaluates. Ties count against the target. Metrics: HR@k and NDCG@k for each k of `top_k`, MRR.

The same protocol runs unchanged on the full ``ratings.dat`` (leave ``ratings_path`` None) or on the team's copy of
users 1-2999 (``ratings_path="partial/ratings_users0001-2999.dat.gz"``), reported as "ML-1M (users 1-2999)".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gr_models.data.collate import BatchCollator
from gr_models.data.dataset import SequenceDataset
from gr_models.data.movielens import MovieLensDataset, TieOrder, Variant
from gr_models.metrics.retrieval import RetrievalMetrics
from gr_models.model.retrieval_gr import RetrievalGR

__all__ = ["ProtocolSplits", "RetrievalProtocol", "evaluate_retrieval", "movielens_splits"]


@dataclass(frozen=True)
class RetrievalProtocol:
    """See the module docstring."""

    tie_order: TieOrder = "file"
    validation: bool = True
    max_sequence_length: int = 200
    filter_seen: bool = True
    top_k: tuple[int, ...] = (10, 50, 200)

    def __post_init__(self) -> None:
        if self.tie_order not in ("file", "item"):
            raise ValueError(f"tie_order must be 'file' or 'item', got {self.tie_order!r}")
        if self.max_sequence_length < 2:
            raise ValueError(
                f"max_sequence_length must be >= 2 (a history event and a target), got {self.max_sequence_length}"
            )
        if not self.top_k or min(self.top_k) < 1:
            raise ValueError(f"top_k must be positive cut-offs, got {self.top_k}")

    def describe(self) -> str:
        """One line naming every choice that changes the numbers."""
        held_out = "validation = second-to-last, test = last" if self.validation else "test = last"
        seen = "seen items filtered" if self.filter_seen else "seen items ranked"
        return (
            f"leave-last-out ({held_out}), ties in {self.tie_order} order, max {self.max_sequence_length} events, "
            f"full-catalogue ranking, {seen}"
        )


@dataclass
class ProtocolSplits:
    """The datasets of one protocol.

    Attributes:
        train: next-item training sequences (retrieval "train" split).
        valid: the second-to-last rating of each user as the target, or None without validation.
        test: the last rating of each user as the target.
        excluded_items: bool `[V]` over item ids `[0, V)`: True for ids that are no catalogue item.
    """

    train: SequenceDataset
    valid: SequenceDataset | None
    test: SequenceDataset
    excluded_items: torch.Tensor


def movielens_splits(
    root: str | Path,
    protocol: RetrievalProtocol,
    *,
    ratings_path: str | Path | None = None,
    variant: Variant = "1m",
) -> ProtocolSplits:
    """Build the train / validation / test datasets of `protocol` from the MovieLens files in `root`."""

    def dataset(split: str, exclude_last_events: int) -> MovieLensDataset:
        return MovieLensDataset(
            root,
            variant=variant,
            kind="retrieval",
            split=split,  # type: ignore[arg-type]
            max_sequence_length=protocol.max_sequence_length,
            holdout=1,
            ratings_path=ratings_path,
            with_timestamps=True,
            user_features=[],
            with_user_id=False,
            tie_order=protocol.tie_order,
            exclude_last_events=exclude_last_events,
        )

    test = dataset("eval", 0)
    valid = dataset("eval", 1) if protocol.validation else None
    train = dataset("train", 1 if protocol.validation else 0)
    vocab = test.schema.vocab_sizes["item_id"]
    excluded = np.ones(vocab, dtype=bool)
    excluded[test.catalogue_ids] = False
    return ProtocolSplits(train=train, valid=valid, test=test, excluded_items=torch.from_numpy(excluded))


@torch.no_grad()
def evaluate_retrieval(
    model: RetrievalGR,
    dataset: SequenceDataset,
    protocol: RetrievalProtocol,
    excluded_items: torch.Tensor,
    *,
    batch_size: int = 256,
) -> dict[str, float]:
    """HR@k, NDCG@k (k in `protocol.top_k`) and MRR of `model` on the held-out targets of `dataset`.

    The model's `eval_exclude_history` must equal `protocol.filter_seen` (the model applies the filter).
    """
    if model.task_config.eval_exclude_history != protocol.filter_seen:
        raise ValueError(
            f"the protocol has filter_seen={protocol.filter_seen} but the model's RetrievalConfig has "
            f"eval_exclude_history={model.task_config.eval_exclude_history}: make them agree"
        )
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=BatchCollator(dataset.schema)
    )
    item_name = dataset.schema.item_feature_name
    corpus = model.all_item_embeddings(item_name)
    metrics = RetrievalMetrics(protocol.top_k, sync_dist=False)
    for batch in loader:
        ranks = model.evaluate_batch(batch, corpus, excluded_items)["ranks"]
        metrics.update_from_ranks(ranks.cpu())
    model.train(was_training)
    return metrics.compute()
