"""Pieces shared by the standalone collections: building tables from TorchRec configs, reading KJTs."""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, DataType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dynamicemb.embedding_table import DynamicEmbeddingTable
from dynamicemb.modules.input_checks import checked_lengths_per_key
from dynamicemb.optimizer import DynamicEmbOptimizerArgs
from dynamicemb.options import DynamicEmbTableOptions

__all__ = [
    "DynamicEmbModule",
    "FeatureIds",
    "OptimizerArg",
    "TableOptionsArg",
    "build_tables",
    "check_not_a_silent_replica",
]

TableOptionsArg = DynamicEmbTableOptions | Mapping[str, DynamicEmbTableOptions] | None
OptimizerArg = DynamicEmbOptimizerArgs | Mapping[str, Any] | None

_DTYPES = {DataType.FP32: torch.float32, DataType.FP16: torch.float16, DataType.BF16: torch.bfloat16}


class DynamicEmbModule(ABC):
    """A module holding dynamic tables; :func:`~dynamicemb.DynamicEmbDump` and friends find them here."""

    @abstractmethod
    def dynamic_embedding_tables(self) -> Mapping[str, DynamicEmbeddingTable]:
        """Tables by name."""

    def flush(self) -> None:
        """Write the rows of every cached table back to its backing storage."""
        for table in self.dynamic_embedding_tables().values():
            table.flush()


def check_not_a_silent_replica(module: torch.nn.Module, process_local: bool) -> None:
    """Raise if an unsharded dynamic collection trains inside a world of several processes.

    Its tables are not ``nn.Parameter``s, so neither DDP nor ``DistributedModelParallel`` (without
    dynamicemb's sharders) synchronizes them: every rank would train its own diverging copy.
    ``process_local=True`` (a constructor argument) says that is intended.
    """
    if process_local or not module.training or not dist.is_available() or not dist.is_initialized():
        return
    world_size = dist.get_world_size()
    if world_size > 1:
        raise RuntimeError(
            f"{type(module).__name__} is unsharded but trains in a world of {world_size} processes: each rank "
            "would train its own unsynchronized copy of the tables (DDP and DistributedModelParallel without "
            "dynamicemb's sharders do not sync them). Shard the tables instead: a TorchRec EmbeddingCollection / "
            "EmbeddingBagCollection with DynamicEmbParameterConstraints(use_dynamicemb=True), planned by "
            "DynamicEmbeddingShardingPlanner and wrapped by DistributedModelParallel with "
            "DynamicEmbeddingCollectionSharder / DynamicEmbeddingBagCollectionSharder (see "
            "examples/sharded_example.py), or gr_parallel.distribute(model), which shards this module as it is. "
            "Pass process_local=True to keep a per-rank table on purpose."
        )


def _options_for(name: str, table_options: TableOptionsArg) -> DynamicEmbTableOptions:
    if table_options is None:
        return DynamicEmbTableOptions()
    if isinstance(table_options, DynamicEmbTableOptions):
        return table_options
    if name not in table_options:
        raise KeyError(f"table_options has no entry for table {name!r} (it has {sorted(table_options)})")
    return table_options[name]


def _optimizer_args(optimizer: OptimizerArg) -> DynamicEmbOptimizerArgs:
    if optimizer is None:
        return DynamicEmbOptimizerArgs()
    if isinstance(optimizer, DynamicEmbOptimizerArgs):
        return optimizer
    return DynamicEmbOptimizerArgs.from_fused_params(optimizer)


def build_tables(
    configs: Sequence[BaseEmbeddingConfig],
    device: torch.device | None,
    table_options: TableOptionsArg,
    optimizer: OptimizerArg,
) -> dict[str, DynamicEmbeddingTable]:
    """One :class:`DynamicEmbeddingTable` per TorchRec config, by table name."""
    if isinstance(table_options, Mapping):
        unknown = set(table_options) - {config.name for config in configs}
        if unknown:
            raise KeyError(f"table_options names unknown tables {sorted(unknown)}")
    optimizer_args = _optimizer_args(optimizer)
    tables: dict[str, DynamicEmbeddingTable] = {}
    for config in configs:
        if not config.name:
            raise ValueError(f"every table config needs a name: {config}")
        if config.name in tables:
            raise ValueError(f"duplicate table name {config.name!r}")
        if config.data_type not in _DTYPES:
            raise TypeError(f"table {config.name!r}: data_type {config.data_type} is not supported (FP32, FP16, BF16)")
        tables[config.name] = DynamicEmbeddingTable(
            name=config.name,
            dim=config.embedding_dim,
            num_embeddings=config.num_embeddings,
            options=_options_for(config.name, table_options),
            optimizer=optimizer_args,
            dtype=_DTYPES[config.data_type],
            device=device,
        )
    return tables


class FeatureIds:
    """Per-feature slices of a KJT's ids, read with plain tensor ops (no fbgemm operators).

    The KJT is checked first (:func:`~dynamicemb.modules.input_checks.checked_lengths_per_key`):
    lengths that do not match the ids raise before any id reaches a table."""

    def __init__(self, features: KeyedJaggedTensor) -> None:
        if features.variable_stride_per_key():
            raise NotImplementedError("KeyedJaggedTensor with a variable batch size per feature is not supported")
        lengths_per_key = checked_lengths_per_key(features)
        self.features = features
        self.values = features.values()
        self.weights = features.weights_or_none()
        self.lengths = features.lengths()
        self.batch_size = features.stride()
        self.position = {key: i for i, key in enumerate(features.keys())}
        self.offset_per_key = [0, *itertools.accumulate(lengths_per_key)]

    def _index(self, feature: str) -> int:
        if feature not in self.position:
            raise KeyError(f"feature {feature!r} is missing from the KeyedJaggedTensor (keys {self.features.keys()})")
        return self.position[feature]

    def ids(self, feature: str) -> torch.Tensor:
        i = self._index(feature)
        return self.values[self.offset_per_key[i] : self.offset_per_key[i + 1]]

    def feature_weights(self, feature: str) -> torch.Tensor:
        if self.weights is None:
            raise ValueError(f"feature {feature!r}: the module is weighted but the KeyedJaggedTensor has no weights")
        i = self._index(feature)
        return self.weights[self.offset_per_key[i] : self.offset_per_key[i + 1]]

    def feature_lengths(self, feature: str) -> torch.Tensor:
        i = self._index(feature)
        return self.lengths[i * self.batch_size : (i + 1) * self.batch_size]

    def table_ids(self, features: Sequence[str], device: torch.device, index_type: torch.dtype | None) -> torch.Tensor:
        """The ids of ``features`` concatenated, as int64 on ``device``."""
        parts = [self.ids(feature) for feature in features]
        if index_type is not None and self.values.dtype != index_type:
            raise TypeError(f"ids of {list(features)} are {self.values.dtype}, the table's index_type is {index_type}")
        ids = parts[0] if len(parts) == 1 else torch.cat(parts)
        return ids.to(device=device, dtype=torch.int64)
