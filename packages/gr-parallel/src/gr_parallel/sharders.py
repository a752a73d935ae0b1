"""dynamicemb's sharders, plus a fused optimizer per module for converted standalone dynamic collections.

A standalone ``dynamicemb.DynamicEmbeddingCollection`` carries its own optimizer; after
:mod:`gr_parallel.dynamic_conversion` turns it into a TorchRec collection to be sharded, the
sharder must build that module's tables with that optimizer rather than with the sharder-wide
``fused_params``. These subclasses look the module's fused parameters up by its path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchrec.distributed.types import ModuleSharder, ParameterSharding, ShardedModule, ShardingEnv
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from dynamicemb.distributed import (
    DynamicEmbeddingBagCollectionSharder,
    DynamicEmbeddingCollectionSharder,
    ShardedDynamicEmbeddingBagCollection,
    ShardedDynamicEmbeddingCollection,
)

__all__ = ["build_sharders"]

FusedParamsByModule = Mapping[str, Mapping[str, Any]]


class _CollectionSharder(DynamicEmbeddingCollectionSharder):
    def __init__(self, module_fused_params: FusedParamsByModule, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._module_fused_params = dict(module_fused_params)

    def shard(  # type: ignore[override]
        self,
        module: EmbeddingCollection,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedModule:
        own = self._module_fused_params.get(module_fqn or "")
        if own is None:
            return super().shard(module, params, env, device, module_fqn)
        return ShardedDynamicEmbeddingCollection(
            module,
            params,
            env,
            fused_params={**(self.fused_params or {}), **own},
            device=device,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
            use_index_dedup=self._use_index_dedup,
            module_fqn=module_fqn,
        )


class _BagCollectionSharder(DynamicEmbeddingBagCollectionSharder):
    def __init__(self, module_fused_params: FusedParamsByModule, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._module_fused_params = dict(module_fused_params)

    def shard(  # type: ignore[override]
        self,
        module: EmbeddingBagCollection,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedModule:
        own = self._module_fused_params.get(module_fqn or "")
        if own is None:
            return super().shard(module, params, env, device, module_fqn)
        return ShardedDynamicEmbeddingBagCollection(
            module,
            params,
            env,
            fused_params={**(self.fused_params or {}), **own},
            device=device,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
            use_index_dedup=self._use_index_dedup,
            module_fqn=module_fqn,
        )


def build_sharders(
    fused_params: Mapping[str, Any] | None,
    module_fused_params: FusedParamsByModule,
    use_index_dedup: bool,
    qcomm_codecs_registry: Mapping[str, Any] | None,
) -> list[ModuleSharder[nn.Module]]:
    """Sharders of ``EmbeddingCollection`` and ``EmbeddingBagCollection`` (static tables by TorchRec,
    dynamic ones by dynamicemb); ``module_fused_params`` overrides ``fused_params`` by module path."""
    common: dict[str, Any] = {
        "fused_params": dict(fused_params) if fused_params is not None else None,
        "use_index_dedup": use_index_dedup,
        "qcomm_codecs_registry": dict(qcomm_codecs_registry) if qcomm_codecs_registry is not None else None,
    }
    return [
        _CollectionSharder(module_fused_params, **common),  # type: ignore[list-item]
        _BagCollectionSharder(module_fused_params, **common),  # type: ignore[list-item]
    ]
