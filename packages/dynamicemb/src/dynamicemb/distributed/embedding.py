"""``ShardedDynamicEmbeddingCollection`` and ``DynamicEmbeddingCollectionSharder``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.types import CommOp, ParameterSharding, QuantizedCommCodecs, ShardedModule, ShardingEnv
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor

from dynamicemb.distributed.common import module_fused_params, split_parameter_shardings
from dynamicemb.distributed.sharded_collection import (
    DynamicEmbCollectionContext,
    FeatureBatch,
    ShardedDynamicCollection,
    on_cuda,
)
from dynamicemb.modules.common import FeatureIds

__all__ = ["DynamicEmbeddingCollectionSharder", "ShardedDynamicEmbeddingCollection"]


def _torchrec_sharder(
    fused_params: dict[str, Any] | None,
    qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None,
    use_index_dedup: bool,
    device: torch.device | None,
) -> EmbeddingCollectionSharder:
    """TorchRec's sharder for the ordinary tables; TorchRec's own index dedup runs a CUDA-only
    fbgemm kernel, so it is asked for on CUDA devices only."""
    return EmbeddingCollectionSharder(
        fused_params=fused_params,
        qcomm_codecs_registry=qcomm_codecs_registry,
        use_index_dedup=use_index_dedup and on_cuda(device),
    )


class ShardedDynamicEmbeddingCollection(ShardedDynamicCollection[dict[str, JaggedTensor]]):
    """An ``EmbeddingCollection`` whose dynamic tables are sharded row-wise by dynamicemb.

    Input: this rank's ``KeyedJaggedTensor`` (``B`` samples, data-parallel). Output, as
    ``EmbeddingCollection``'s: ``Dict[str, JaggedTensor]``, per feature values ``[ids, D]`` (dtype
    ``fused_params["output_dtype"]``, float32 by default) and lengths ``[B]`` (and the ids as
    weights with ``need_indices``). Ids travel to their owner ranks and embeddings back with
    :class:`~dynamicemb.distributed.routing.ShardRouter` (torch ops and ``torch.distributed``
    collectives only); the fused optimizer of ``fused_params`` updates the owners' rows during the
    backward. Ordinary TorchRec tables of the same collection are sharded by TorchRec's
    ``ShardedEmbeddingCollection`` held inside (their state dict keys stay
    ``embeddings.<table>.weight``).
    """

    comm_op = CommOp.SEQUENCE_EMBEDDINGS_ALL_TO_ALL.name

    def __init__(
        self,
        module: EmbeddingCollection,
        table_name_to_parameter_sharding: dict[str, ParameterSharding],
        env: ShardingEnv,
        fused_params: dict[str, Any] | None = None,
        device: torch.device | None = None,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
        use_index_dedup: bool = False,
        module_fqn: str | None = None,
    ) -> None:
        super().__init__(
            module.embedding_configs(),
            table_name_to_parameter_sharding,
            env,
            fused_params,
            device,
            qcomm_codecs_registry,
            use_index_dedup,
        )
        self._need_indices = module.need_indices()
        if self._static_configs:
            sub = EmbeddingCollection(
                tables=self._static_configs, device=torch.device("meta"), need_indices=self._need_indices
            )
            sub.embeddings = nn.ModuleDict({c.name: module.embeddings[c.name] for c in self._static_configs})
            sharder = _torchrec_sharder(fused_params, qcomm_codecs_registry, use_index_dedup, device)
            self._set_static(sharder.shard(sub, self._static_parameter_shardings, env, device, module_fqn))

    @property
    def unsharded_module_type(self) -> type[EmbeddingCollection]:
        return EmbeddingCollection

    def embedding_configs(self) -> list[BaseEmbeddingConfig]:
        return list(self._configs)

    def describe_batch(self, ids: FeatureIds, config: BaseEmbeddingConfig, device: torch.device) -> FeatureBatch:
        feature_ids = [ids.ids(f) for f in config.feature_names]
        return FeatureBatch(
            sizes=[t.numel() for t in feature_ids],
            lengths=[ids.feature_lengths(f).to(device) for f in config.feature_names],
            ids=[t.to(device) for t in feature_ids] if self._need_indices else None,
        )

    def assemble_output(
        self, ctx: DynamicEmbCollectionContext, rows: list[torch.Tensor], static: dict[str, JaggedTensor] | None
    ) -> dict[str, JaggedTensor]:
        merged: dict[str, JaggedTensor] = dict(static or {})
        for names, table_rows, batch in zip(self.dynamic_embedding_names(), rows, ctx.batches):
            for i, (name, values) in enumerate(zip(names, table_rows.split(batch.sizes))):
                merged[name] = JaggedTensor(
                    values=values,
                    lengths=batch.lengths[i],
                    weights=batch.ids[i] if batch.ids is not None else None,
                )
        return {name: merged[name] for name in self.embedding_names()}


class DynamicEmbeddingCollectionSharder(EmbeddingCollectionSharder):
    """Shards ``EmbeddingCollection``s whose plan holds dynamic tables (from
    :class:`~dynamicemb.planner.DynamicEmbeddingShardingPlanner`).

    qcomm_codecs_registry: TorchRec's registry; its SEQUENCE_EMBEDDINGS_ALL_TO_ALL entry sets the
        wire dtypes of the dynamic tables' embedding all-to-all (FP32, FP16 or BF16).
    fused_params: TorchRec's fused parameters. ``optimizer`` (an ``EmbOptimType`` or its name:
        SGD/EXACT_SGD, ADAM, ADAMW, (EXACT_)ADAGRAD, (EXACT_)ROWWISE_ADAGRAD), ``learning_rate``,
        ``beta1``, ``beta2``, ``eps``, ``weight_decay``, ``weight_decay_mode``,
        ``gradient_clipping``, ``max_gradient`` make the dynamic tables' fused optimizer;
        ``output_dtype`` their embeddings' dtype. Everything goes on to TorchRec for the other tables.
    use_index_dedup: deduplicate each rank's ids of a dynamic table before the all-to-all and
        restore them after (same results, less traffic when ids repeat).
    module_fused_params: fused parameters by module path (as the plan names modules) that
        override ``fused_params`` for that module's dynamic tables (and its ordinary tables when it
        has dynamic ones), e.g. a per-module optimizer; the planner sizes those tables with them.

    A collection whose plan has no dynamic table gets TorchRec's ``ShardedEmbeddingCollection``.
    """

    handles_dynamic_tables = True

    def __init__(
        self,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
        fused_params: dict[str, Any] | None = None,
        use_index_dedup: bool = False,
        module_fused_params: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(
            fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry, use_index_dedup=use_index_dedup
        )
        self._module_fused_params = {path: dict(params) for path, params in (module_fused_params or {}).items()}

    def fused_params_for(self, module_fqn: str | None) -> dict[str, Any] | None:
        """The fused parameters of the dynamic tables of module ``module_fqn``: ``fused_params``
        updated with its ``module_fused_params`` entry, if any."""
        return module_fused_params(self.fused_params, self._module_fused_params, module_fqn)

    def shard(  # type: ignore[override]
        self,
        module: EmbeddingCollection,
        params: dict[str, ParameterSharding],
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedModule:
        dynamic, _ = split_parameter_shardings(params)
        if not dynamic:
            sharder = _torchrec_sharder(self.fused_params, self.qcomm_codecs_registry, self._use_index_dedup, device)
            return sharder.shard(module, params, env, device, module_fqn)
        return ShardedDynamicEmbeddingCollection(
            module,
            params,
            env,
            fused_params=self.fused_params_for(module_fqn),
            device=device,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
            use_index_dedup=self._use_index_dedup,
            module_fqn=module_fqn,
        )
