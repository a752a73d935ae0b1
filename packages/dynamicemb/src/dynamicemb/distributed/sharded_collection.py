"""The sharded-collection machinery shared by the sequence (EC) and pooled (EBC) collections."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
import torch.distributed as dist
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    LazyGetItemMixin,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardedModule,
    ShardingEnv,
)
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.modules.embedding_modules import get_embedding_names_by_table
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Multistreamable

from dynamicemb.distributed.common import (
    JoinedAwaitable,
    ShardedDynamicEmbModule,
    build_router,
    remap_child_state_dict,
    select_features,
    split_parameter_shardings,
)
from dynamicemb.distributed.fused_optimizer import DynamicEmbFusedOptimizer
from dynamicemb.distributed.parameter_sharding import KeyDistribution
from dynamicemb.distributed.routing import RoutedKeys
from dynamicemb.embedding_table import DynamicEmbeddingTable
from dynamicemb.modules.common import FeatureIds

__all__ = [
    "DynamicEmbCollectionContext",
    "DynamicEmbComputeOutput",
    "DynamicEmbDistInput",
    "FeatureBatch",
    "ShardedDynamicCollection",
]

Out = TypeVar("Out")


@dataclass
class FeatureBatch:
    """One dynamic table's features in this rank's batch: per feature, its id count, lengths
    ``[B]``, and the ids and weights when the output needs them."""

    sizes: list[int]
    lengths: list[torch.Tensor]
    ids: list[torch.Tensor] | None = None
    weights: list[torch.Tensor] | None = None

    def tensors(self) -> list[torch.Tensor]:
        return self.lengths + (self.ids or []) + (self.weights or [])


@dataclass
class DynamicEmbCollectionContext(Multistreamable):
    """Per-batch state of a sharded dynamic collection (and of its ordinary tables)."""

    batch_size: int = 0
    batches: list[FeatureBatch] = field(default_factory=list)
    static_context: Any = None

    def record_stream(self, stream: torch.Stream) -> None:
        for batch in self.batches:
            for tensor in batch.tensors():
                tensor.record_stream(stream)  # type: ignore[arg-type]
        if self.static_context is not None:
            self.static_context.record_stream(stream)


@dataclass
class DynamicEmbDistInput(Multistreamable):
    """The input of ``compute``: the routed keys of the dynamic tables and the distributed
    input of the ordinary tables (``None`` without ordinary tables)."""

    routed: RoutedKeys
    static: Any = None

    def record_stream(self, stream: torch.Stream) -> None:
        self.routed.record_stream(stream)
        if self.static is not None:
            self.static.record_stream(stream)


@dataclass
class DynamicEmbComputeOutput:
    """The output of ``compute``: per dynamic table, the embeddings of the keys this rank owns;
    the ordinary tables' compute output."""

    routed: RoutedKeys
    embeddings: list[torch.Tensor]
    static: Any = None


class _DistInputAwaitable(Awaitable[DynamicEmbDistInput]):
    def __init__(self, joined: JoinedAwaitable[RoutedKeys, Any]) -> None:
        super().__init__()
        self._joined = joined

    def _wait_impl(self) -> DynamicEmbDistInput:
        routed, static = self._joined.wait()
        return DynamicEmbDistInput(routed=routed, static=static)


class _InputAwaitable(Awaitable[Awaitable[DynamicEmbDistInput]]):
    def __init__(self, dynamic: Awaitable[Awaitable[RoutedKeys]], static: Awaitable[Awaitable[Any]] | None) -> None:
        super().__init__()
        self._dynamic, self._static = dynamic, static

    def _wait_impl(self) -> Awaitable[DynamicEmbDistInput]:
        inner: JoinedAwaitable[RoutedKeys, Any] = JoinedAwaitable(
            self._dynamic.wait(), None if self._static is None else self._static.wait()
        )
        return _DistInputAwaitable(inner)


class _OutputAwaitable(LazyGetItemMixin[str, Any], LazyAwaitable[Out]):
    """Waits the ordinary tables' output (if any) and merges it with the dynamic tables' output."""

    def __init__(self, collection: ShardedDynamicCollection[Out], ctx: DynamicEmbCollectionContext,
                 rows: list[torch.Tensor], static: LazyAwaitable[Any] | None) -> None:  # fmt: skip
        super().__init__()
        self._collection, self._ctx, self._rows, self._static = collection, ctx, rows, static

    def _wait_impl(self) -> Out:
        static = None if self._static is None else self._static.wait()
        return self._collection.assemble_output(self._ctx, self._rows, static)


class ShardedDynamicCollection(
    ShardedModule[DynamicEmbDistInput, DynamicEmbComputeOutput, Out, DynamicEmbCollectionContext],
    ShardedDynamicEmbModule,
    FusedOptimizerModule,
    Generic[Out],
):
    """A TorchRec collection whose dynamic tables are sharded row-wise by dynamicemb and whose
    other tables (if any) are sharded by TorchRec, in a child module ``_static``.

    :attr:`fused_optimizer` (what ``DistributedModelParallel.fused_optimizer`` collects) holds the
    dynamic tables' learning rates (:class:`DynamicEmbFusedOptimizer`) and the ordinary tables'
    fused optimizer.

    Subclasses name the configs, build the TorchRec child and assemble the output.
    """

    comm_op: str

    def __init__(
        self,
        configs: Sequence[BaseEmbeddingConfig],
        table_name_to_parameter_sharding: dict[str, ParameterSharding],
        env: ShardingEnv,
        fused_params: dict[str, Any] | None,
        device: torch.device | None,
        qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None,
        use_index_dedup: bool,
    ) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        dynamic, static = split_parameter_shardings(table_name_to_parameter_sharding)
        unknown = sorted(set(table_name_to_parameter_sharding) - {c.name for c in configs})
        if unknown:
            raise ValueError(f"the plan names tables {unknown} that the {self.unsharded_module_type.__name__} lacks")
        self._configs = list(configs)
        self._names_by_table = get_embedding_names_by_table(self._configs)
        self._dynamic_configs = [c for c in self._configs if c.name in dynamic]
        self._static_configs = [c for c in self._configs if c.name in static]
        self._static_parameter_shardings = static
        self._env = env
        self._router = build_router(
            self._dynamic_configs,
            dynamic,
            env,
            device,
            fused_params,
            qcomm_codecs_registry,
            self.comm_op,
            use_index_dedup,
        )
        self._tables = {table.name: table for table in self._router.tables}
        self._distributions = {name: sharding.key_distribution for name, sharding in dynamic.items()}
        self._static_features = [f for c in self._static_configs for f in c.feature_names]
        self._static: ShardedModule | None = None
        self._dynamic_optimizer = DynamicEmbFusedOptimizer(self._tables)

    def _set_static(self, child: ShardedModule) -> None:
        self._static = child
        remap_child_state_dict(self, "_static")

    def _fqn_modifiers(self) -> dict[str, str]:
        # The state dict names the TorchRec child's tables ``embeddings.*`` while the attribute is
        # ``_static``: torch.distributed.checkpoint follows this map from keys to attributes.
        return {"embeddings": "_static"} if self._static is not None else {}

    # --- ShardedDynamicEmbModule ------------------------------------------------------------------
    def dynamic_embedding_tables(self) -> dict[str, DynamicEmbeddingTable]:
        return dict(self._tables)

    def key_distributions(self) -> dict[str, KeyDistribution]:
        return dict(self._distributions)

    @property
    def process_group(self) -> dist.ProcessGroup:
        assert self._env.process_group is not None
        return self._env.process_group

    # --- FusedOptimizerModule ---------------------------------------------------------------------
    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        """The dynamic tables' optimizer, combined with the ordinary tables' fused optimizer (its
        keys are those of this module's state dict, ``embeddings.<table>.weight``)."""
        if isinstance(self._static, FusedOptimizerModule):
            return CombinedOptimizer([self._dynamic_optimizer, self._static.fused_optimizer])
        return self._dynamic_optimizer

    # --- what subclasses provide -------------------------------------------------------------------
    @abstractmethod
    def describe_batch(self, ids: FeatureIds, config: BaseEmbeddingConfig, device: torch.device) -> FeatureBatch:
        """What :meth:`assemble_output` needs of one dynamic table's features in the batch."""

    @abstractmethod
    def assemble_output(self, ctx: DynamicEmbCollectionContext, rows: list[torch.Tensor], static: Any) -> Out:
        """The module's output from, per dynamic table, ``[N_t, D_t]`` embeddings in id order, and
        the ordinary tables' output (``None`` without ordinary tables)."""

    # --- ShardedModule -----------------------------------------------------------------------------
    def create_context(self) -> DynamicEmbCollectionContext:
        static = self._static.create_context() if self._static is not None else None
        return DynamicEmbCollectionContext(static_context=static)

    def input_dist(
        self, ctx: DynamicEmbCollectionContext, features: KeyedJaggedTensor
    ) -> Awaitable[Awaitable[DynamicEmbDistInput]]:
        ids = FeatureIds(features)
        device = self._router.tables[0].device
        ctx.batch_size = ids.batch_size
        ctx.batches = []
        per_table = []
        for config, table in zip(self._dynamic_configs, self._router.tables):
            per_table.append(ids.table_ids(config.feature_names, device, table.options.index_type))
            ctx.batches.append(self.describe_batch(ids, config, device))
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

    def output_dist(self, ctx: DynamicEmbCollectionContext, output: DynamicEmbComputeOutput) -> LazyAwaitable[Out]:
        rows = self._router.answer(output.routed, output.embeddings)
        static = None
        if self._static is not None:
            static = self._static.output_dist(ctx.static_context, output.static)
        return _OutputAwaitable(self, ctx, rows, static)

    def compute_and_output_dist(
        self, ctx: DynamicEmbCollectionContext, input: DynamicEmbDistInput
    ) -> LazyAwaitable[Out]:
        embeddings = self._router.lookup(input.routed, training=self.training)
        rows = self._router.answer(input.routed, embeddings)
        static = None
        if self._static is not None:
            static = self._static.compute_and_output_dist(ctx.static_context, input.static)
        return _OutputAwaitable(self, ctx, rows, static)

    def embedding_names(self) -> list[str]:
        """Output names in order (``"feature"`` or ``"feature@table"`` for shared features)."""
        return [name for names in self._names_by_table for name in names]

    def dynamic_embedding_names(self) -> list[list[str]]:
        """Output names of each dynamic table's features."""
        dynamic = {c.name for c in self._dynamic_configs}
        return [names for config, names in zip(self._configs, self._names_by_table) if config.name in dynamic]


def on_cuda(device: torch.device | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"
