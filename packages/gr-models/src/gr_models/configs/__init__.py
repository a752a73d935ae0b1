"""Configurations of a GR: the HSTU block, embedding tables and the ranking or retrieval task."""

from gr_models.configs.embedding_config import (
    BaseEmbeddingConfig,
    DynamicShardedEmbeddingConfig,
    EmbeddingOptimizerParam,
    ShardedEmbeddingConfig,
)
from gr_models.configs.hstu_config import (
    HSTUConfig,
    PositionEncodingConfig,
    RelativeBiasConfig,
    get_hstu_config,
    parse_dtype,
    parse_kernel_backend,
)
from gr_models.configs.task_config import RankingConfig, RetrievalConfig
from hstu_attn import KernelBackend

__all__ = [
    "BaseEmbeddingConfig",
    "DynamicShardedEmbeddingConfig",
    "EmbeddingOptimizerParam",
    "HSTUConfig",
    "KernelBackend",
    "PositionEncodingConfig",
    "RankingConfig",
    "RelativeBiasConfig",
    "RetrievalConfig",
    "ShardedEmbeddingConfig",
    "get_hstu_config",
    "parse_dtype",
    "parse_kernel_backend",
]
