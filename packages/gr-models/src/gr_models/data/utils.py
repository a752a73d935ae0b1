"""The batch types under the import path users of other HSTU libraries know (``...data.utils``)."""

from gr_models.data.batch import Batch, FeatureConfig, RankingBatch, RetrievalBatch

__all__ = ["Batch", "FeatureConfig", "RankingBatch", "RetrievalBatch"]
