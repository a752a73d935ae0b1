"""``ShardedDynamicEmbeddingCollection`` and its sharder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.types import (
    Awaitable,
    CommOp,
    LazyAwaitable,
    LazyGetItemMixin,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardedModule,
    ShardingEnv,
)
from torchrec.modules.embedding_modules import EmbeddingCollection, get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor
from torchrec.streamable import Multistreamable

from dynamicemb.distributed.common import (
    JoinedAwaitable,
    ShardedDynamicEmbModule,
    build_router,
    remap_child_state_dict,
    select_features,
    split_parameter_shardings,
)
from dynamicemb.distributed.routing import RoutedKeys
from dynamicemb.embedding_table import DynamicEmbeddingTable
from dynamicemb.modules.common import FeatureIds
from dynamicemb.planner.parameter_sharding import KeyDistribution

__all__ = ["DynamicEmbeddingCollectionSharder", "ShardedDynamicEmbeddingCollection"]

@dataclass
class _FeatureBatch:
    """One dynamic table's features in this rank's batch: per feature, its id count, lengths
    ``[B]`` and (with ``need_indices``) ids."""

    sizes: list[int]
    lengths: list[torch.Tensor]
    ids: list[torch.Tensor] | None


@dataclass
class DynamicEmbCollectionContext(Multistreamable):
    """Per-batch state of a :class:`ShardedDynamicEmbeddingCollection` (and of its ordinary tables)."""

    batches: list[_FeatureBatch] = field(default_factory=list)
    static_context: Any = None

    def record_stream(self, stream: torch.Stream) -> None:
        for batch in self.batches:
            for tensor in batch.lengths + (batch.ids or []):
                tensor.record_stream(stream)  # type: ignore[arg-type]
        if self.static_context is not None:
            self.static_context.record_stream(stream)


@dataclass
class DynamicEmbDistInput(Multistreamable):
    """The input of :meth:`ShardedDynamicEmbeddingCollection.compute`: the routed keys of the
    dynamic tables and the distributed input of the ordinary tables (or ``None``)."""

    routed: RoutedKeys
    static: Any = None

    def record_stream(self, stream: torch.Stream) -> None:
        self.routed.record_stream(stream)
        if self.static is not None:
            self.static.record_stream(stream)


@dataclass
class DynamicEmbComputeOutput:
    routed: RoutedKeys
    embeddings: list[torch.Tensor]
    static: Any = None


class _InputAwaitable(Awaitable[Awaitable[DynamicEmbDistInput]]):
    def __init__(self, dynamic: Awaitable[Awaitable[RoutedKeys]], static: Awaitable[Awaitable[Any]] | None) -> None:
        super().__init__()
        self._dynamic, self._static = dynamic, static

    def _wait_impl(self) -> Awaitable[DynamicEmbDistInput]:
        inner = JoinedAwaitable(self._dynamic.wait(), None if self._static is None else self._static.wait())
        return _DistInputAwaitable(inner)


class _DistInputAwaitable(Awaitable[DynamicEmbDistInput]):
    def __init__(self, joined: JoinedAwaitable[RoutedKeys, Any]) -> None:
        super().__init__()
        self._joined = joined

    def _wait_impl(self) -> DynamicEmbDistInput:
        routed, static = self._joined.wait()
        return DynamicEmbDistInput(routed=routed, static=static)


class _OutputAwaitable(LazyGetItemMixin[str, JaggedTensor], LazyAwaitable[dict[str, JaggedTensor]]):
    def __init__(
        self,
        dynamic: dict[str, JaggedTensor],
        static: LazyAwaitable[dict[str, JaggedTensor]] | None,
        names: list[str],
    ) -> None:
        super().__init__()
        self._dynamic, self._static, self._names = dynamic, static, names

    def _wait_impl(self) -> dict[str, JaggedTensor]:
        merged = dict(self._dynamic)
        if self._static is not None:
            merged.update(self._static.wait())
        return {name: merged[name] for name in self._names}


def _static_sharder(
    fused_params: dict[str, Any] | None,
    qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None,
    use_index_dedup: bool,
    device: torch.device | None,
) -> EmbeddingCollectionSharder:
    """TorchRec's sharder for the ordinary tables; TorchRec's own index dedup runs a CUDA-only
    fbgemm kernel, so it is asked for on CUDA devices only."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    return EmbeddingCollectionSharder(
        fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry, use_index_dedup=use_index_dedup and on_cuda
    )


class ShardedDynamicEmbeddingCollection(
    ShardedModule[DynamicEmbDistInput, DynamicEmbComputeOutput, dict[str, JaggedTensor], DynamicEmbCollectionContext],
    ShardedDynamicEmbModule,
):
    """An ``EmbeddingCollection`` whose dynamic tables are sharded row-wise by dynamicemb.

    Input: a data-parallel ``KeyedJaggedTensor`` (this rank's batch of ``B`` samples); output:
    ``Dict[str, JaggedTensor]`` as ``EmbeddingCollection`` returns (per feature, values
    ``[ids, D]`` in the ``output_dtype`` of ``fused_params``, float32 by default, and lengths
    ``[B]``). Ids go to their owner ranks with :class:`~dynamicemb.distributed.routing.ShardRouter`
    (torch ops and ``torch.distributed`` collectives only); the tables' fused optimizer (from
    ``fused_params``) updates the owners' rows during the backward. Ordinary TorchRec tables of the
    same collection (any other plan entry) are sharded by TorchRec's ``ShardedEmbeddingCollection``,
    held inside this module; their state dict keys stay ``embeddings.<table>.weight``.
    """

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
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        dynamic, static = split_parameter_shardings(table_name_to_parameter_sharding)
        configs = module.embedding_configs()
        unknown = sorted(set(table_name_to_parameter_sharding) - {c.name for c in configs})
        if unknown:
            raise ValueError(f"the plan names tables {unknown} that the EmbeddingCollection does not have")
        self._configs = list(configs)
        self._names_by_table = get_embedding_names_by_table(self._configs)
        self._dynamic_configs = [c for c in self._configs if c.name in dynamic]
        self._need_indices = module.need_indices()
        self._env = env
        self._router = build_router(
            self._dynamic_configs,
            dynamic,
            env,
            device,
            fused_params,
            qcomm_codecs_registry,
            CommOp.SEQUENCE_EMBEDDINGS_ALL_TO_ALL.name,
            use_index_dedup,
        )
        self._tables = {table.name: table for table in self._router.tables}
        self._distributions = {name: sharding.key_distribution for name, sharding in dynamic.items()}
        self._static_features: list[str] = []
        self._static: ShardedModule | None = None
        static_configs = [c for c in self._configs if c.name in static]
        if static_configs:
            sub = EmbeddingCollection(tables=static_configs, device=torch.device("meta"), need_indices=self._need_indices)
            sub.embeddings = nn.ModuleDict({c.name: module.embeddings[c.name] for c in static_configs})
            sharder = _static_sharder(fused_params, qcomm_codecs_registry, use_index_dedup, device)
            self._static = sharder.shard(sub, static, env, device, module_fqn)
            remap_child_state_dict(self, "_static")
            self._static_features = [f for c in static_configs for f in c.feature_names]

    # --- ShardedDynamicEmbModule ------------------------------------------------------------------
    def dynamic_embedding_tables(self) -> dict[str, DynamicEmbeddingTable]:
        return dict(self._tables)

    def key_distributions(self) -> dict[str, KeyDistribution]:
        return dict(self._distributions)

    @property
    def process_group(self) -> dist.ProcessGroup:
        assert self._env.process_group is not None
        return self._env.process_group

    def embedding_configs(self) -> list[Any]:
        return list(self._configs)

    @property
    def unsharded_module_type(self) -> type[EmbeddingCollection]:
        return EmbeddingCollection

    # --- ShardedModule -----------------------------------------------------------------------------
    def create_context(self) -> DynamicEmbCollectionContext:
        static = self._static.create_context() if self._static is not None else None
        return DynamicEmbCollectionContext(static_context=static)

    def input_dist(
        self, ctx: DynamicEmbCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[DynamicEmbDistInput]]:
        ids = FeatureIds(features)
        device = self._router.tables[0].device
        per_table = []
        ctx.batches = []
        for config, table in zip(self._dynamic_configs, self._router.tables):
            per_table.append(ids.table_ids(config.feature_names, device, table.options.index_type))
            feature_ids = [ids.ids(f) for f in config.feature_names]
            ctx.batches.append(
                _FeatureBatch(
                    sizes=[t.numel() for t in feature_ids],
                    lengths=[ids.feature_lengths(f).to(device) for f in config.feature_names],
                    ids=[t.to(device) for t in feature_ids] if self._need_indices else None,
                )
            )
        dynamic = self._router.route(per_table)
        static = None
        if self._static is not None:
            static = self._static.input_dist(ctx.static_context, select_features(ids, self._static_features))
        return _InputAwaitable(dynamic, static)

    def compute(self, ctx: DynamicEmbCollectionContext, dist_input: DynamicEmbDistInput) -> DynamicEmbComputeOutput:
        embeddings = self._router.lookup(dist_input.routed, training=self.training)
        static = None
        if self._static is not None:
            static = self._static.compute(ctx.static_context, dist_input.static)
        return DynamicEmbComputeOutput(dist_input.routed, embeddings, static)

    def _dynamic_output(self, ctx: DynamicEmbCollectionContext, rows: list[torch.Tensor]) -> dict[str, JaggedTensor]:
        out: dict[str, JaggedTensor] = {}
        for config, names, table_rows, batch in zip(
            self._dynamic_configs, self._dynamic_names(), rows, ctx.batches
        ):
            for i, (name, values) in enumerate(zip(names, table_rows.split(batch.sizes))):
                out[name] = JaggedTensor(
                    values=values,
                    lengths=batch.lengths[i],
                    weights=batch.ids[i] if batch.ids is not None else None,
                )
        return out

    def _dynamic_names(self) -> list[list[str]]:
        dynamic = {c.name for c in self._dynamic_configs}
        return [names for config, names in zip(self._configs, self._names_by_table) if config.name in dynamic]

    def _all_names(self) -> list[str]:
        return [name for names in self._names_by_table for name in names]

    def output_dist(
        self, ctx: DynamicEmbCollectionContext, output: DynamicEmbComputeOutput
    ) -> LazyAwaitable[dict[str, JaggedTensor]]:
        rows = self._router.answer(output.routed, output.embeddings)
        static = None
        if self._static is not None:
            static = self._static.output_dist(ctx.static_context, output.static)
        return _OutputAwaitable(self._dynamic_output(ctx, rows), static, self._all_names())

    def compute_and_output_dist(
        self, ctx: DynamicEmbCollectionContext, input: DynamicEmbDistInput
    ) -> LazyAwaitable[dict[str, JaggedTensor]]:
        embeddings = self._router.lookup(input.routed, training=self.training)
        rows = self._router.answer(input.routed, embeddings)
        static = None
        if self._static is not None:
            static = self._static.compute_and_output_dist(ctx.static_context, input.static)
        return _OutputAwaitable(self._dynamic_output(ctx, rows), static, self._all_names())


class DynamicEmbeddingCollectionSharder(EmbeddingCollectionSharder):
    """Shards ``EmbeddingCollection``s whose plan holds dynamic tables.

    qcomm_codecs_registry: TorchRec's registry; the SEQUENCE_EMBEDDINGS_ALL_TO_ALL entry sets the
        dtypes of the embedding all-to-all of dynamic tables (FP32, FP16 or BF16).
    fused_params: TorchRec fused parameters: ``optimizer`` (an ``EmbOptimType`` or its name),
        ``learning_rate``, ``beta1``, ``beta2``, ``eps``, ``weight_decay``, ``weight_decay_mode``,
        ``gradient_clipping``, ``max_gradient`` set the dynamic tables' fused optimizer;
        ``output_dtype`` the dtype of their embeddings. All are passed on to TorchRec for the
        ordinary tables.
    use_index_dedup: deduplicate each rank's ids before the all-to-all (results are the same;
        less traffic when ids repeat).

    A module whose plan has no dynamic table gets TorchRec's ``ShardedEmbeddingCollection``.
    """

    handles_dynamic_tables = True

    def __init__(
        self,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None,
        fused_params: dict[str, Any] | None = None,
        use_index_dedup: bool = False,
    ) -> None:
        super().__init__(
            fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry, use_index_dedup=use_index_dedup
        )

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
            static_sharder = _static_sharder(self.fused_params, self.qcomm_codecs_registry, self._use_index_dedup, device)
            return static_sharder.shard(module, params, env, device, module_fqn)
        return ShardedDynamicEmbeddingCollection(
            module,
            params,
            env,
            fused_params=self.fused_params,
            device=device,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
            use_index_dedup=self._use_index_dedup,
            module_fqn=module_fqn,
        )

