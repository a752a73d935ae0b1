"""Kept on purpose: the seed-000 tutorial (users' API) imports the batch types from ``data.utils``."""

from gr_models.data.batch import Batch, FeatureConfig, RankingBatch, RetrievalBatch

__all__ = ["Batch", "FeatureConfig", "RankingBatch", "RetrievalBatch"]
