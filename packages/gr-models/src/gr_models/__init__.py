"""HSTU ranking and retrieval generative recommenders: configs, data, models, trainer and CLI.

Subpackages: `gr_models.configs` (HSTU, task and embedding configs), `gr_models.data` (batches, datasets,
loading), `gr_models.modules` (embeddings, HSTU blocks, heads, losses), `gr_models.model` (RankingGR,
RetrievalGR, SASRec), `gr_models.metrics`, `gr_models.trainer` (the `gr-train` loop) and `gr_models.utils`.
"""

from gr_models.configs import (
    DynamicShardedEmbeddingConfig,
    EmbeddingOptimizerParam,
    KernelBackend,
    RankingConfig,
    RetrievalConfig,
    ShardedEmbeddingConfig,
    get_hstu_config,
)
from gr_models.model import RankingGR, RetrievalGR, SASRec

__version__ = "0.1.0"

__all__ = [
    "DynamicShardedEmbeddingConfig",
    "EmbeddingOptimizerParam",
    "KernelBackend",
    "RankingConfig",
    "RankingGR",
    "RetrievalConfig",
    "RetrievalGR",
    "SASRec",
    "ShardedEmbeddingConfig",
    "__version__",
    "get_hstu_config",
]
