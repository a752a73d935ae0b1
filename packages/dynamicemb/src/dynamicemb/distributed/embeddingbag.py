"""``ShardedDynamicEmbeddingBagCollection`` and ``DynamicEmbeddingBagCollectionSharder``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import CommOp, ParameterSharding, QuantizedCommCodecs, ShardedModule, ShardingEnv
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from dynamicemb.distributed.common import module_fused_params, split_parameter_shardings
from dynamicemb.distributed.sharded_collection import (
    DynamicEmbCollectionContext,
    FeatureBatch,
    ShardedDynamicCollection,
)
from dynamicemb.modules.common import FeatureIds
from dynamicemb.pooling import pool_bags

__all__ = ["DynamicEmbeddingBagCollectionSharder", "ShardedDynamicEmbeddingBagCollection", "pool_bags"]


class ShardedDynamicEmbeddingBagCollection(ShardedDynamicCollection[KeyedTensor]):
    """An ``EmbeddingBagCollection`` whose dynamic tables are sharded row-wise by dynamicemb.

    Input: this rank's ``KeyedJaggedTensor`` (``B`` samples). Output, as
    ``EmbeddingBagCollection``'s: a ``KeyedTensor`` of values ``[B, sum of D]`` float32, one key
    per feature in table order. The embedding of every (deduplicated) id comes back from its owner
    rank and is pooled here (SUM or MEAN, scaled by the KJT weights when ``is_weighted``), so the
    traffic is per id, not per bag. Ordinary tables are sharded by TorchRec's
    ``ShardedEmbeddingBagCollection`` held inside.
    """

    comm_op = CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL.name

    def __init__(
        self,
        module: EmbeddingBagCollection,
        table_name_to_parameter_sharding: dict[str, ParameterSharding],
        env: ShardingEnv,
        fused_params: dict[str, Any] | None = None,
        device: torch.device | None = None,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
        use_index_dedup: bool = False,
        module_fqn: str | None = None,
    ) -> None:
        configs = module.embedding_bag_configs()
        for config in configs:
            if config.name in table_name_to_parameter_sharding and config.pooling not in (
                PoolingType.SUM,
                PoolingType.MEAN,
            ):
                raise ValueError(f"table {config.name!r}: pooling must be SUM or MEAN, got {config.pooling}")
        super().__init__(
            configs, table_name_to_parameter_sharding, env, fused_params, device, qcomm_codecs_registry, use_index_dedup
        )
        self._is_weighted = module.is_weighted()
        if self._static_configs:
            sub = EmbeddingBagCollection(
                tables=self._static_configs, is_weighted=self._is_weighted, device=torch.device("meta")
            )
            sub.embedding_bags = nn.ModuleDict({c.name: module.embedding_bags[c.name] for c in self._static_configs})
            sharder = EmbeddingBagCollectionSharder(
                fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry
            )
            self._set_static(sharder.shard(sub, self._static_parameter_shardings, env, device, module_fqn))

    @property
    def unsharded_module_type(self) -> type[EmbeddingBagCollection]:
        return EmbeddingBagCollection

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return list(self._configs)  # type: ignore[arg-type]

    def describe_batch(self, ids: FeatureIds, config: BaseEmbeddingConfig, device: torch.device) -> FeatureBatch:
        features = config.feature_names
        return FeatureBatch(
            sizes=[ids.ids(f).numel() for f in features],
            lengths=[ids.feature_lengths(f).to(device) for f in features],
            weights=[ids.feature_weights(f).to(device) for f in features] if self._is_weighted else None,
        )

    def assemble_output(
        self, ctx: DynamicEmbCollectionContext, rows: list[torch.Tensor], static: KeyedTensor | None
    ) -> KeyedTensor:
        pooled: dict[str, torch.Tensor] = static.to_dict() if static is not None else {}
        for config, names, table_rows, batch in zip(
            self._dynamic_configs, self.dynamic_embedding_names(), rows, ctx.batches
        ):
            for i, (name, values) in enumerate(zip(names, table_rows.split(batch.sizes))):
                weights = batch.weights[i] if batch.weights is not None else None
                deterministic = self._tables[config.name].deterministic
                pooled[name] = pool_bags(values, batch.lengths[i], weights, config.pooling, deterministic)  # type: ignore[attr-defined]
        names = self.embedding_names()
        dims = [c.embedding_dim for c in self._configs for _ in c.feature_names]
        return KeyedTensor(
            keys=names, length_per_key=dims, values=torch.cat([pooled[n] for n in names], dim=1), key_dim=1
        )


class DynamicEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """Shards ``EmbeddingBagCollection``s whose plan holds dynamic tables; arguments as
    :class:`~dynamicemb.distributed.DynamicEmbeddingCollectionSharder` (the registry entry is
    POOLED_EMBEDDINGS_ALL_TO_ALL). A collection whose plan has no dynamic table gets TorchRec's
    ``ShardedEmbeddingBagCollection``."""

    handles_dynamic_tables = True

    def __init__(
        self,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
        fused_params: dict[str, Any] | None = None,
        use_index_dedup: bool = False,
        module_fused_params: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)
        self._use_index_dedup = use_index_dedup
        self._module_fused_params = {path: dict(params) for path, params in (module_fused_params or {}).items()}

    def fused_params_for(self, module_fqn: str | None) -> dict[str, Any] | None:
        """The fused parameters of the dynamic tables of module ``module_fqn``: ``fused_params``
        updated with its ``module_fused_params`` entry, if any."""
        return module_fused_params(self.fused_params, self._module_fused_params, module_fqn)

    def shard(  # type: ignore[override]
        self,
        module: EmbeddingBagCollection,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedModule:
        dynamic, _ = split_parameter_shardings(params)
        if not dynamic:
            return super().shard(module, params, env, device, module_fqn)
        return ShardedDynamicEmbeddingBagCollection(
            module,
            params,
            env,
            fused_params=self.fused_params_for(module_fqn),
            device=device,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
            use_index_dedup=self._use_index_dedup,
            module_fqn=module_fqn,
        )
