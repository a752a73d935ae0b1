"""Data: batch types, datasets (synthetic, MovieLens, KuaiRand, Parquet/ORC), feature ops and the loading pipeline.

The token layout every dataset produces and every model consumes is described in `gr_models.data.batch`.
"""

from gr_models.data.batch import Batch, FeatureConfig, RankingBatch, RetrievalBatch
from gr_models.data.collate import BatchCollator, collate_samples
from gr_models.data.dataset import InMemorySequenceDataset, SequenceDataset, UserSequences
from gr_models.data.errors import DataValidationError
from gr_models.data.feature_ops import BucketizeTimestamps, CheckVocab, FeatureOp, HashIds, Truncate
from gr_models.data.hashing import hash_int64, hash_strings, murmur3_x64_128, to_key_space
from gr_models.data.jagged import JaggedColumn
from gr_models.data.kuairand import KuaiRandDataset
from gr_models.data.movielens import MovieLensDataset
from gr_models.data.pipeline import UserShardSampler, build_dataloader, data_parallel_position
from gr_models.data.sample import SequenceSample, Window, WindowPolicy
from gr_models.data.schema import UNBOUNDED_VOCAB, DatasetSchema
from gr_models.data.synthetic import SyntheticConfig, SyntheticDataset
from gr_models.data.table import FeatureColumn, SequenceTableDataset

__all__ = [
    "UNBOUNDED_VOCAB",
    "Batch",
    "BatchCollator",
    "BucketizeTimestamps",
    "CheckVocab",
    "DataValidationError",
    "DatasetSchema",
    "FeatureColumn",
    "FeatureConfig",
    "FeatureOp",
    "HashIds",
    "InMemorySequenceDataset",
    "JaggedColumn",
    "KuaiRandDataset",
    "MovieLensDataset",
    "RankingBatch",
    "RetrievalBatch",
    "SequenceDataset",
    "SequenceSample",
    "SequenceTableDataset",
    "SyntheticConfig",
    "SyntheticDataset",
    "Truncate",
    "UserSequences",
    "UserShardSampler",
    "Window",
    "WindowPolicy",
    "build_dataloader",
    "collate_samples",
    "data_parallel_position",
    "hash_int64",
    "hash_strings",
    "murmur3_x64_128",
    "to_key_space",
]
