"""Retrieval metrics from the rank of each held-out target item: HR@k, NDCG@k and MRR, accumulated over batches.

The rank is 0-based and pessimistic about ties: every other item scoring at least as high as the target counts
as ahead of it, so a model that scores every item alike gets the worst rank, never a free hit.
For one query with rank ``r``: ``HR@k = [r < k]``, ``NDCG@k = [r < k] / log2(r + 2)`` (one relevant item),
``MRR = 1 / (r + 1)``; each metric is the mean over queries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from gr_models.metrics.base import IncrementalMetric, all_reduce_sum

__all__ = ["RetrievalMetrics", "target_ranks"]


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each query's target among all items.

    Args:
        scores: ``[Q, num_items]`` scores over the full corpus.
        targets: ``[Q]`` int target item index per query (a column of ``scores``).
        exclude: optional bool ``[Q, num_items]``; True marks items left out of the ranking (e.g. padding or
            already-seen items). The target itself is never excluded.

    Returns:
        int64 ``[Q]``: number of non-excluded other items with a score ``>=`` the target's.
    """
    if scores.dim() != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"need scores [Q, items] and targets [Q], got {tuple(scores.shape)}, {tuple(targets.shape)}")
    targets = targets.long()
    if targets.numel() and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        raise ValueError(f"target ids must lie in [0, {scores.shape[1]})")
    target_scores = scores.gather(1, targets.unsqueeze(1))
    ahead = scores >= target_scores
    ahead.scatter_(1, targets.unsqueeze(1), False)
    if exclude is not None:
        ahead &= ~exclude
    return ahead.sum(dim=1)


class RetrievalMetrics(IncrementalMetric):
    """HR@k and NDCG@k for every k in ``ks``, and MRR; keys ``"hr@10"``, ``"ndcg@10"``, ``"mrr"``."""

    def __init__(
        self,
        ks: Sequence[int] = (1, 10, 50, 200),
        *,
        sync_dist: bool = True,
        process_group: dist.ProcessGroup | None = None,
    ):
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be positive cut-offs, got {list(ks)}")
        self.ks = sorted(set(int(k) for k in ks))
        super().__init__(sync_dist=sync_dist, process_group=process_group)

    def reset(self) -> None:
        # Layout: [hits@k for k in ks, ndcg@k for k in ks, reciprocal rank, count]
        self._sums = torch.zeros(2 * len(self.ks) + 2, dtype=torch.float64)

    def update_from_ranks(self, ranks: torch.Tensor) -> None:
        """Add queries given their targets' 0-based ranks ``[Q]``."""
        ranks = ranks.detach().reshape(-1).to(torch.float64)
        if ranks.numel() and ranks.min() < 0:
            raise ValueError("ranks must be >= 0")
        if self._sums.device != ranks.device:
            self._sums = self._sums.to(ranks.device)
        ks = torch.tensor(self.ks, dtype=torch.float64, device=ranks.device).unsqueeze(1)
        hit = (ranks.unsqueeze(0) < ks).double()
        gain = hit / torch.log2(ranks + 2).unsqueeze(0)
        self._sums[: len(self.ks)] += hit.sum(dim=1)
        self._sums[len(self.ks) : 2 * len(self.ks)] += gain.sum(dim=1)
        self._sums[-2] += (1.0 / (ranks + 1)).sum()
        self._sums[-1] += ranks.numel()

    def update(self, scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None) -> None:
        """Add queries given full-corpus ``scores [Q, num_items]`` and ``targets [Q]`` (see `target_ranks`)."""
        self.update_from_ranks(target_ranks(scores.detach(), targets, exclude))

    def compute(self) -> dict[str, float]:
        sums = all_reduce_sum(self._sums, self.process_group) if self._syncing() else self._sums
        count = float(sums[-1])
        if count == 0:
            values = torch.full_like(sums, float("nan"))
        else:
            values = sums / count
        results = {f"hr@{k}": float(values[i]) for i, k in enumerate(self.ks)}
        results.update({f"ndcg@{k}": float(values[len(self.ks) + i]) for i, k in enumerate(self.ks)})
        results["mrr"] = float(values[-2])
        return results
