"""Incremental metrics: per-task AUC / accuracy / log-loss for ranking; HR@k, NDCG@k, MRR for retrieval."""

from gr_models.metrics.base import IncrementalMetric
from gr_models.metrics.classification import (
    BinaryAccuracy,
    BinaryAUC,
    BinaryLogLoss,
    MultiTaskBinaryMetrics,
    binary_auc,
)
from gr_models.metrics.retrieval import RetrievalMetrics, target_ranks

__all__ = [
    "BinaryAUC",
    "BinaryAccuracy",
    "BinaryLogLoss",
    "IncrementalMetric",
    "MultiTaskBinaryMetrics",
    "RetrievalMetrics",
    "binary_auc",
    "target_ranks",
]
