"""Per-task binary classification metrics for ranking: exact AUC, accuracy and log-loss, accumulated over batches.

Inputs are ``predictions [N, T]`` (logits by default, probabilities with ``from_logits=False``) and 0/1
``labels [N, T]``; ``[N]`` is read as one task. Results are keyed ``"<metric>/<task name>"``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gr_models.metrics.base import IncrementalMetric, all_gather_concat, all_reduce_sum

__all__ = ["BinaryAUC", "BinaryAccuracy", "BinaryLogLoss", "MultiTaskBinaryMetrics", "binary_auc"]


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC of one task (ties count one half, as scikit-learn's ``roc_auc_score``).

    Mann-Whitney form: ``(sum of positive ranks - P (P + 1) / 2) / (P N)`` with tied scores sharing their
    average rank. NaN when the labels hold a single class.
    """
    scores = scores.reshape(-1).double()
    labels = labels.reshape(-1).double()
    positives = float(labels.sum())
    negatives = labels.numel() - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    sorted_scores, order = torch.sort(scores)
    _, group, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average_rank = ends - (counts.double() - 1) / 2
    positive_rank_sum = float((average_rank[group] * labels[order]).sum())
    return (positive_rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def _as_2d(tensor: torch.Tensor, num_tasks: int, what: str) -> torch.Tensor:
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(1)
    if tensor.dim() != 2 or tensor.shape[1] != num_tasks:
        raise ValueError(f"{what} must have shape [N, {num_tasks}] (or [N] for one task), got {tuple(tensor.shape)}")
    return tensor


class _BinaryMetric(IncrementalMetric):
    name = ""

    def __init__(
        self,
        task_names: Sequence[str] | int = 1,
        *,
        from_logits: bool = True,
        sync_dist: bool = True,
        process_group: dist.ProcessGroup | None = None,
    ):
        self.task_names = [f"task{t}" for t in range(task_names)] if isinstance(task_names, int) else list(task_names)
        if not self.task_names:
            raise ValueError("at least one task is needed")
        self.from_logits = from_logits
        super().__init__(sync_dist=sync_dist, process_group=process_group)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def _inputs(self, predictions: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        predictions = _as_2d(predictions.detach(), self.num_tasks, "predictions")
        labels = _as_2d(labels.detach(), self.num_tasks, "labels")
        if predictions.shape != labels.shape:
            raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ")
        return predictions.double(), labels.double()

    @abstractmethod
    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: ``predictions`` and 0/1 ``labels``, both ``[N, T]`` (or ``[N]`` for one task)."""

    def _keyed(self, values: Sequence[float]) -> dict[str, float]:
        return {f"{self.name}/{task}": float(v) for task, v in zip(self.task_names, values)}


class BinaryAUC(_BinaryMetric):
    """Exact per-task AUC: keeps every prediction (float64) and label (uint8) until `reset`."""

    name = "auc"

    def reset(self) -> None:
        self._predictions: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        predictions, labels = self._inputs(predictions, labels)
        self._predictions.append(predictions)
        self._labels.append(labels.to(torch.uint8))

    def compute(self) -> dict[str, float]:
        if self._predictions:
            predictions, labels = torch.cat(self._predictions), torch.cat(self._labels)
        else:
            predictions = torch.zeros(0, self.num_tasks, dtype=torch.float64)
            labels = torch.zeros(0, self.num_tasks, dtype=torch.uint8)
        if self._syncing():
            predictions = all_gather_concat(predictions, self.process_group)
            labels = all_gather_concat(labels, self.process_group)
        return self._keyed([binary_auc(predictions[:, t], labels[:, t]) for t in range(self.num_tasks)])


class _SummedMetric(_BinaryMetric):
    """Metrics that are a per-task sum over examples divided by the count."""

    def reset(self) -> None:
        self._sums = torch.zeros(self.num_tasks, dtype=torch.float64)
        self._count = torch.zeros(1, dtype=torch.float64)

    @abstractmethod
    def _per_example(self, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``[N, T]`` per-example values whose mean is the metric."""

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        predictions, labels = self._inputs(predictions, labels)
        if self._sums.device != predictions.device:
            self._sums, self._count = self._sums.to(predictions.device), self._count.to(predictions.device)
        self._sums += self._per_example(predictions, labels).sum(dim=0)
        self._count += predictions.shape[0]

    def compute(self) -> dict[str, float]:
        sums, count = self._sums, self._count
        if self._syncing():
            sums, count = all_reduce_sum(sums, self.process_group), all_reduce_sum(count, self.process_group)
        if float(count) == 0:
            return self._keyed([float("nan")] * self.num_tasks)
        return self._keyed((sums / count).tolist())


class BinaryAccuracy(_SummedMetric):
    """Per-task accuracy of predicting 1 when the probability is ``>= threshold`` (0.5: logit ``>= 0``)."""

    name = "accuracy"

    def __init__(
        self,
        task_names: Sequence[str] | int = 1,
        *,
        threshold: float = 0.5,
        from_logits: bool = True,
        sync_dist: bool = True,
        process_group: dist.ProcessGroup | None = None,
    ):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        self.threshold = threshold
        super().__init__(task_names, from_logits=from_logits, sync_dist=sync_dist, process_group=process_group)

    def _per_example(self, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        probabilities = torch.sigmoid(predictions) if self.from_logits else predictions
        return ((probabilities >= self.threshold).double() == labels).double()


class BinaryLogLoss(_SummedMetric):
    """Per-task mean binary cross-entropy (natural log). Probabilities are clipped to ``[eps, 1 - eps]``
    (float64 machine epsilon) like scikit-learn's ``log_loss``; logits use the exact stable formula."""

    name = "logloss"

    def _per_example(self, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.from_logits:
            return F.binary_cross_entropy_with_logits(predictions, labels, reduction="none")
        eps = torch.finfo(torch.float64).eps
        return F.binary_cross_entropy(predictions.clamp(eps, 1 - eps), labels, reduction="none")


class MultiTaskBinaryMetrics:
    """AUC, accuracy and log-loss of every task together; ``compute()`` gives keys like ``"auc/click"``."""

    def __init__(
        self,
        task_names: Sequence[str] | int = 1,
        *,
        from_logits: bool = True,
        sync_dist: bool = True,
        process_group: dist.ProcessGroup | None = None,
    ):
        self.metrics: list[_BinaryMetric] = [
            metric_class(task_names, from_logits=from_logits, sync_dist=sync_dist, process_group=process_group)
            for metric_class in (BinaryAUC, BinaryAccuracy, BinaryLogLoss)
        ]

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        for metric in self.metrics:
            metric.update(predictions, labels)

    def compute(self) -> dict[str, float]:
        results: dict[str, float] = {}
        for metric in self.metrics:
            results.update(metric.compute())
        return results

    def reset(self) -> None:
        for metric in self.metrics:
            metric.reset()
