"""Embedding table configurations: static TorchRec tables and dynamic (hash-table) tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from gr_models.utils.tensor_initializer import Initializer, UniformInitializer

SUPPORTED_SPARSE_OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad", "rowwise_adagrad")


@dataclass
class EmbeddingOptimizerParam:
    """The optimizer applied to the rows of one embedding table (sparse: only rows looked up in a step move).

    `optimizer_str` is one of "sgd", "adam", "adamw", "adagrad", "rowwise_adagrad".
    """

    optimizer_str: str
    learning_rate: float
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        self.optimizer_str = self.optimizer_str.lower()
        if self.optimizer_str not in SUPPORTED_SPARSE_OPTIMIZERS:
            raise ValueError(
                f"unknown embedding optimizer {self.optimizer_str!r}; expected one of {SUPPORTED_SPARSE_OPTIMIZERS}"
            )
        if self.learning_rate <= 0:
            raise ValueError(f"embedding learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ValueError(f"embedding weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class BaseEmbeddingConfig:
    """Fields shared by every table: the features it serves, its name, rows, width, init and optimizer."""

    feature_names: list[str]
    table_name: str
    vocab_size: int
    dim: int
    initializer: Initializer = field(default_factory=UniformInitializer)
    optimizer_param: EmbeddingOptimizerParam = field(
        default_factory=lambda: EmbeddingOptimizerParam(optimizer_str="adam", learning_rate=1e-3)
    )

    def __post_init__(self) -> None:
        if not self.feature_names:
            raise ValueError(f"table {self.table_name!r} needs at least one feature name")
        if len(set(self.feature_names)) != len(self.feature_names):
            raise ValueError(f"table {self.table_name!r} lists a feature twice: {self.feature_names}")
        if self.vocab_size <= 0:
            raise ValueError(f"table {self.table_name!r}: vocab_size must be > 0, got {self.vocab_size}")
        if self.dim <= 0:
            raise ValueError(f"table {self.table_name!r}: dim must be > 0, got {self.dim}")


@dataclass
class ShardedEmbeddingConfig(BaseEmbeddingConfig):
    """A static TorchRec table of `vocab_size` rows.

    In a model built in a world of several processes, `sharding_type` "model_parallel" shards rows across ranks
    (TorchRec row-wise, optimizer fused into the backward) where this device's fbgemm TBE can train the table's
    optimizer, else keeps it replicated with a warning (see `gr_models.modules.embedding_sharding`); "data_parallel"
    replicates the table on every rank and averages its gradient with the dense part. In one process both are plain
    tables.
    """

    sharding_type: Literal["model_parallel", "data_parallel"] = "model_parallel"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sharding_type not in ("model_parallel", "data_parallel"):
            raise ValueError(
                f"table {self.table_name!r}: sharding_type must be 'model_parallel' or 'data_parallel', "
                f"got {self.sharding_type!r}"
            )


@dataclass
class DynamicShardedEmbeddingConfig(BaseEmbeddingConfig):
    """A dynamicemb hash table: any int64 id is accepted; `vocab_size` is the table's capacity in rows.

    `global_hbm_for_values` is the GPU-memory budget (bytes, summed over ranks) for embedding values and optimizer
    state; None keeps all values in GPU memory, 0 keeps them in host memory. `evict_strategy` is a
    `dynamicemb.DynamicEmbEvictStrategy` (None: the dynamicemb default). `extra_table_options` are passed
    unchanged to `dynamicemb.DynamicEmbTableOptions`.
    """

    global_hbm_for_values: int | None = None
    evict_strategy: Any = None
    extra_table_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.global_hbm_for_values is not None and self.global_hbm_for_values < 0:
            raise ValueError(
                f"table {self.table_name!r}: global_hbm_for_values must be >= 0 or None, "
                f"got {self.global_hbm_for_values}"
            )
