"""Data: batch types, datasets (synthetic, MovieLens, KuaiRand, Parquet/ORC) and the loading pipeline."""

from gr_models.data.batch import Batch, FeatureConfig, RankingBatch, RetrievalBatch

__all__ = ["Batch", "FeatureConfig", "RankingBatch", "RetrievalBatch"]
