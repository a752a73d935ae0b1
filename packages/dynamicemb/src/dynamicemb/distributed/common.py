"""Pieces shared by the sharded dynamic collections: plan entries, shard tables, feature selection."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.types import Awaitable, ParameterSharding, ShardingEnv
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, DataType, data_type_to_dtype
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dynamicemb.distributed.comm import comm_dtypes
from dynamicemb.distributed.parameter_sharding import DynamicEmbParameterSharding, KeyDistribution, shard_table_options
from dynamicemb.distributed.routing import ShardRouter
from dynamicemb.embedding_table import DynamicEmbeddingTable
from dynamicemb.modules.common import FeatureIds
from dynamicemb.optimizer import DynamicEmbOptimizerArgs

__all__ = [
    "JoinedAwaitable",
    "ShardedDynamicEmbModule",
    "build_router",
    "module_fused_params",
    "output_dtype",
    "remap_child_state_dict",
    "select_features",
    "split_parameter_shardings",
]

_CUSTOMIZED = EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value
_OUTPUT_DTYPES = {"FP32": torch.float32, "FP16": torch.float16, "BF16": torch.bfloat16}


class ShardedDynamicEmbModule(ABC):
    """A sharded module holding one shard of each of its dynamic tables on every rank of its
    process group; :func:`dynamicemb.DynamicEmbDump` and friends find them here."""

    @abstractmethod
    def dynamic_embedding_tables(self) -> Mapping[str, DynamicEmbeddingTable]:
        """This rank's shard of each dynamic table, by table name."""

    @abstractmethod
    def key_distributions(self) -> Mapping[str, KeyDistribution]:
        """Each dynamic table's key rule."""

    @property
    @abstractmethod
    def process_group(self) -> dist.ProcessGroup:
        """The ranks the dynamic tables are sharded over."""

    def flush(self) -> None:
        """Write the cached rows of this rank's shards back to their backing storage."""
        for table in self.dynamic_embedding_tables().values():
            table.flush()


def split_parameter_shardings(
    params: Mapping[str, ParameterSharding],
) -> tuple[dict[str, DynamicEmbParameterSharding], dict[str, ParameterSharding]]:
    """Plan entries of one module -> (dynamic tables, ordinary TorchRec tables)."""
    dynamic: dict[str, DynamicEmbParameterSharding] = {}
    static: dict[str, ParameterSharding] = {}
    for name, sharding in params.items():
        if isinstance(sharding, DynamicEmbParameterSharding):
            dynamic[name] = sharding
        elif sharding.compute_kernel == _CUSTOMIZED:
            raise TypeError(
                f"table {name!r}: compute kernel {_CUSTOMIZED!r} needs a DynamicEmbParameterSharding "
                f"(from DynamicEmbeddingShardingPlanner), got {type(sharding).__name__}"
            )
        else:
            static[name] = sharding
    return dynamic, static


def module_fused_params(
    fused_params: Mapping[str, Any] | None,
    by_module: Mapping[str, Mapping[str, Any]],
    module_fqn: str | None,
) -> dict[str, Any] | None:
    """``fused_params`` updated with ``by_module[module_fqn]`` when the module has its own entry."""
    own = by_module.get(module_fqn or "")
    if own is None:
        return dict(fused_params) if fused_params is not None else None
    return {**(fused_params or {}), **own}


def output_dtype(fused_params: Mapping[str, Any] | None) -> torch.dtype:
    """The dtype of looked-up embeddings: ``fused_params["output_dtype"]`` (a ``SparseType`` or
    ``DataType``: FP32, FP16 or BF16), float32 by default."""
    raw = (fused_params or {}).get("output_dtype")
    if raw is None:
        return torch.float32
    name = str(getattr(raw, "name", raw)).upper()
    if name not in _OUTPUT_DTYPES:
        raise ValueError(f"fused_params output_dtype {raw!r} is not supported by dynamic tables (FP32, FP16, BF16)")
    return _OUTPUT_DTYPES[name]


def build_router(
    configs: Sequence[BaseEmbeddingConfig],
    shardings: Mapping[str, DynamicEmbParameterSharding],
    env: ShardingEnv,
    device: torch.device | None,
    fused_params: Mapping[str, Any] | None,
    qcomm_codecs_registry: Mapping[str, Any] | None,
    comm_op: str,
    use_index_dedup: bool,
) -> ShardRouter:
    """This rank's shard of each dynamic table of ``configs`` and the router between the shards."""
    group = env.process_group
    if group is None:
        raise ValueError("sharding dynamic tables needs a ShardingEnv with a process group")
    world_size = env.world_size
    optimizer = DynamicEmbOptimizerArgs.from_fused_params(fused_params or {})
    tables: list[DynamicEmbeddingTable] = []
    for config in configs:
        sharding = shardings[config.name]
        if sharding.ranks is not None and list(sharding.ranks) != list(range(world_size)):
            raise ValueError(
                f"dynamic table {config.name!r}: the plan shards it over ranks {sharding.ranks}, the process "
                f"group has {world_size} ranks (dynamic tables are sharded over every rank; plan again)"
            )
        options = shard_table_options(config.num_embeddings, sharding.dynamicemb_options, world_size)
        if sharding.shard_capacity and sharding.shard_capacity != options.max_capacity:
            raise ValueError(
                f"dynamic table {config.name!r}: the plan sized shards for {sharding.shard_capacity} slots, "
                f"{world_size} ranks give {options.max_capacity} (was the plan made for another world size?)"
            )
        if config.data_type not in (DataType.FP32, DataType.FP16, DataType.BF16):
            raise TypeError(f"table {config.name!r}: data_type {config.data_type} is not supported (FP32, FP16, BF16)")
        tables.append(
            DynamicEmbeddingTable(
                name=config.name,
                dim=config.embedding_dim,
                num_embeddings=config.num_embeddings,
                options=options,
                optimizer=optimizer,
                dtype=data_type_to_dtype(config.data_type),
                device=device if device is not None else torch.device("cpu"),
            )
        )
    return ShardRouter(
        tables,
        [shardings[config.name].key_distribution for config in configs],
        group,
        use_index_dedup=use_index_dedup,
        output_dtype=output_dtype(fused_params),
        wire_dtypes=comm_dtypes(dict(qcomm_codecs_registry) if qcomm_codecs_registry else None, comm_op),
    )


def select_features(ids: FeatureIds, features: Sequence[str]) -> KeyedJaggedTensor:
    """A KJT of ``features`` only (values, lengths and weights copied with torch ops)."""
    values = torch.cat([ids.ids(f) for f in features])
    lengths = torch.cat([ids.feature_lengths(f) for f in features])
    weights = None
    if ids.weights is not None:
        weights = torch.cat([ids.feature_weights(f) for f in features])
    return KeyedJaggedTensor(keys=list(features), values=values, lengths=lengths, weights=weights)


W1 = TypeVar("W1")
W2 = TypeVar("W2")


class JoinedAwaitable(Awaitable[tuple[Any, Any]], Generic[W1, W2]):
    """Waits two awaitables (either may be ``None``) and returns both results."""

    def __init__(self, first: Awaitable[W1] | None, second: Awaitable[W2] | None) -> None:
        super().__init__()
        self._first, self._second = first, second

    def _wait_impl(self) -> tuple[Any, Any]:
        return (
            None if self._first is None else self._first.wait(),
            None if self._second is None else self._second.wait(),
        )


def remap_child_state_dict(module: nn.Module, child_name: str) -> None:
    """Make the state dict of ``module.<child_name>`` appear at ``module``'s own prefix (so a
    mixed collection keeps TorchRec's ``embeddings.<table>.weight`` keys), both ways."""
    inner = f"{child_name}."

    def rename_out(_module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix + inner)]:
            state_dict[prefix + key[len(prefix + inner) :]] = state_dict.pop(key)

    def rename_in(state_dict: dict[str, Any], prefix: str, *_args: Any, **_kwargs: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + inner)]:
            state_dict[prefix + inner + key[len(prefix) :]] = state_dict.pop(key)

    module._register_state_dict_hook(rename_out)
    hook: Callable[..., None] = rename_in
    module._register_load_state_dict_pre_hook(hook)
