"""The embedding tables of a GR: static TorchRec tables (model- or data-parallel) and dynamic hash tables.

`ShardedEmbedding` takes the batch's `KeyedJaggedTensor` and returns one `JaggedTensor` of embeddings per
feature served by a table (features without a table, e.g. timestamps, are ignored). It is built unsharded: static
tables are TorchRec `EmbeddingCollection`s, dynamic tables standalone dynamicemb collections, each whole in this
process. `shard()` (which a GR model calls when it is built in a world of several processes) shards them in place
through `gr_parallel.shard_embedding_modules` (TorchRec's `DistributedModelParallel` with dynamicemb's planner and
sharders): model-parallel static tables and dynamic tables are split over the ranks, data-parallel tables stay
whole on every rank. With tensor parallelism, the ranks of a tensor-parallel group (which read the same samples)
each look up a part of the samples in the sharded tables and all-gather the embeddings
(`gr_parallel.lookup_split_over_tensor_parallel`); replicated tables are looked up whole on every rank.
Unsharded static tables are trained by `SparseRowOptimizer`s built by `sparse_optimizers()`; sharded static tables
and dynamic tables apply their fused optimizer inside backward.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

import gr_parallel
from gr_models.configs.embedding_config import (
    BaseEmbeddingConfig,
    DynamicShardedEmbeddingConfig,
    EmbeddingOptimizerParam,
    ShardedEmbeddingConfig,
)
from gr_models.data.host_view import HostCopy, host_id_range
from gr_models.modules.sparse_optimizer import SparseRowOptimizer

__all__ = ["EmbeddingOptimizerParam", "ShardedEmbedding"]


def _torchrec_config(config: BaseEmbeddingConfig) -> EmbeddingConfig:
    return EmbeddingConfig(
        num_embeddings=config.vocab_size,
        embedding_dim=config.dim,
        name=config.table_name,
        feature_names=list(config.feature_names),
        init_fn=config.initializer,
    )


def _select(
    jagged: dict[str, JaggedTensor], names: Sequence[str], wanted: set[str], stride: int, ids_per_key: dict[str, int]
) -> KeyedJaggedTensor:
    """A KJT of every feature in `names` (a collection needs all of its features): the wanted ones from `jagged`,
    the others empty. `ids_per_key`: the number of ids of each wanted feature (the source KJT's `length_per_key`,
    known on the host), so that building the KJT reads nothing back from the device."""
    device = next(iter(jagged.values())).values().device
    empty = JaggedTensor(
        values=torch.empty(0, dtype=torch.int64, device=device),
        lengths=torch.zeros(stride, dtype=torch.int64, device=device),
    )
    parts = {name: jagged[name] if name in wanted else empty for name in names}
    per_key = [ids_per_key[name] if name in wanted else 0 for name in names]
    return KeyedJaggedTensor(
        keys=list(names),
        values=torch.cat([jt.values() for jt in parts.values()]),
        lengths=torch.cat([jt.lengths() for jt in parts.values()]),
        stride=stride,
        length_per_key=per_key,
        offset_per_key=[0, *itertools.accumulate(per_key)],
    )


def _tensor_parallel_size() -> int:
    if not gr_parallel.model_parallel_is_initialized():
        return 1
    return gr_parallel.get_tensor_model_parallel_world_size()


class ShardedEmbedding(nn.Module):
    """Every embedding table of a GR, grouped by how it is stored and sharded.

    Children (each present only when it has tables): `model_parallel` and `data_parallel` (TorchRec
    `EmbeddingCollection`s) and `dynamic` (a `ModuleDict` of one `dynamicemb.DynamicEmbeddingCollection` per
    dynamic table, each with its own fused optimizer). After `shard()`, `model_parallel` and the entries of
    `dynamic` are sharded collections (each rank holds its rows; lookups are collective over the ranks).

    Args:
        embedding_configs: `ShardedEmbeddingConfig` / `DynamicShardedEmbeddingConfig` entries, unique table and
            feature names.
        device: where the tables live.
    """

    def __init__(self, embedding_configs: Sequence[BaseEmbeddingConfig], device: torch.device | None = None) -> None:
        super().__init__()
        device = torch.device("cpu") if device is None else torch.device(device)
        self._configs = {c.table_name: c for c in embedding_configs}
        self._feature_to_table = {f: c.table_name for c in embedding_configs for f in c.feature_names}
        model_parallel = [
            c
            for c in embedding_configs
            if isinstance(c, ShardedEmbeddingConfig) and c.sharding_type == "model_parallel"
        ]
        data_parallel = [
            c for c in embedding_configs if isinstance(c, ShardedEmbeddingConfig) and c.sharding_type == "data_parallel"
        ]
        dynamic = [c for c in embedding_configs if isinstance(c, DynamicShardedEmbeddingConfig)]
        unknown = [
            c for c in embedding_configs if not isinstance(c, (ShardedEmbeddingConfig, DynamicShardedEmbeddingConfig))
        ]
        if unknown:
            raise TypeError(f"unsupported embedding config types: {[type(c).__name__ for c in unknown]}")
        self.model_parallel = self._static_collection(model_parallel, device, sparse_grad=True)
        self.data_parallel = self._static_collection(data_parallel, device, sparse_grad=False)
        self.dynamic = self._dynamic_collections(dynamic, device) if dynamic else None
        # (path of the child collection, features it serves); paths, not modules: shard() replaces the children
        self._groups: list[tuple[str, list[str]]] = []
        for name, configs in (("model_parallel", model_parallel), ("data_parallel", data_parallel)):
            if configs:
                self._groups.append((name, [f for c in configs for f in c.feature_names]))
        for config in dynamic:
            self._groups.append((f"dynamic.{config.table_name}", list(config.feature_names)))
        self.is_sharded = False

    @staticmethod
    def _static_collection(
        configs: list[ShardedEmbeddingConfig], device: torch.device, *, sparse_grad: bool
    ) -> EmbeddingCollection | None:
        if not configs:
            return None
        dims = {c.dim for c in configs}
        if len(dims) != 1:
            raise ValueError(
                f"static tables of one sharding type must share one dim; got {[(c.table_name, c.dim) for c in configs]}"
            )
        collection = EmbeddingCollection(tables=[_torchrec_config(c) for c in configs], device=device)
        for table in collection.embeddings.values():
            table.sparse = sparse_grad
        return collection

    @staticmethod
    def _dynamic_collections(configs: list[DynamicShardedEmbeddingConfig], device: torch.device) -> nn.ModuleDict:
        from gr_models.modules.dynamic_embedding import build_dynamic_collection

        return build_dynamic_collection(configs, device)

    @property
    def feature_names(self) -> list[str]:
        """Every feature served by a table."""
        return list(self._feature_to_table)

    def table_config(self, table_name: str) -> BaseEmbeddingConfig:
        """The config of one table, by name (KeyError names the known tables)."""
        try:
            return self._configs[table_name]
        except KeyError:
            raise KeyError(f"unknown table {table_name!r}; tables are {sorted(self._configs)}") from None

    def table_of(self, feature_name: str) -> BaseEmbeddingConfig:
        """The config of the table that serves `feature_name` (KeyError names the served features)."""
        if feature_name not in self._feature_to_table:
            raise KeyError(f"feature {feature_name!r} has no embedding table; tables serve {self.feature_names}")
        return self._configs[self._feature_to_table[feature_name]]

    def _check_static_ids(self, jagged: dict[str, JaggedTensor], names: Sequence[str], host: HostCopy | None) -> None:
        """Every id of a static table's feature lies in the table: checked on the host copy when there is one, else
        on the lookup's device (one synchronization per feature)."""
        for name in names:
            config = self.table_of(name)
            if isinstance(config, DynamicShardedEmbeddingConfig):
                continue
            if host is not None:
                id_range = host_id_range(host, name)
            else:
                ids = jagged[name].values()
                id_range = tuple(torch.stack(torch.aminmax(ids)).tolist()) if ids.numel() else None
            if id_range is None:
                continue
            low, high = id_range
            if low < 0 or high >= config.vocab_size:
                raise ValueError(
                    f"feature {name!r}: ids must lie in [0, {config.vocab_size}) of table {config.table_name!r}; "
                    f"got min {low}, max {high}"
                )

    def lookup(
        self, features: KeyedJaggedTensor, names: Sequence[str], host: HostCopy | None = None
    ) -> dict[str, JaggedTensor]:
        """Embeddings of the features `names` only (each must have a table and be a key of `features`).

        `host`: the host copy of `features` (`Batch.host_copy()`), or None: with it the static ids are checked on
        the host, without it on the device (a synchronization).
        """
        keys = set(features.keys())
        missing = [f for f in names if f not in keys]
        if missing:
            raise ValueError(f"the batch lacks features {missing} that embedding tables expect")
        for name in names:
            self.table_of(name)
        jagged = features.to_dict()
        self._check_static_ids(jagged, names, host)
        ids_per_key = dict(zip(features.keys(), features.length_per_key()))
        wanted = set(names)
        embeddings: dict[str, JaggedTensor] = {}
        sharded = set(gr_parallel.find_sharded_modules(self)) if self.is_sharded else set()
        for path, served in self._groups:
            if any(f in wanted for f in served):
                selected = _select(jagged, served, wanted, features.stride(), ids_per_key)
                module = self.get_submodule(path)
                if path in sharded and selected.stride() >= _tensor_parallel_size():
                    # a tensor-parallel group reads the same samples: each rank looks up its part of them only
                    looked_up = gr_parallel.lookup_split_over_tensor_parallel(module, selected)
                else:
                    looked_up = module(selected)
                embeddings.update({f: looked_up[f] for f in served if f in wanted})
        return embeddings

    def forward(self, features: KeyedJaggedTensor, host: HostCopy | None = None) -> dict[str, JaggedTensor]:
        """Embeddings `{feature: JaggedTensor(values [N_f, dim], lengths [B])}` for every feature with a table.

        `host`: see `lookup`. Raises ValueError if a feature with a table is missing from `features` or a static id
        is out of range.
        """
        return self.lookup(features, self.feature_names, host)

    def static_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(table name, weight) of every unsharded static table (the parameters `sparse_optimizers` trains)."""
        for collection in (self.model_parallel, self.data_parallel):
            if isinstance(collection, EmbeddingCollection):
                yield from ((name, table.weight) for name, table in collection.embeddings.items())

    def sparse_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One `SparseRowOptimizer` per static table, configured by that table's `optimizer_param`."""
        return {
            name: SparseRowOptimizer([weight], self._configs[name].optimizer_param)
            for name, weight in self.static_parameters()
        }

    def sparse_inputs(self, features: KeyedJaggedTensor) -> dict[nn.Module, KeyedJaggedTensor]:
        """`{sharded collection: the KeyedJaggedTensor forward(features) passes it}`, for a train pipeline that
        starts their input all-to-alls ahead (`gr_parallel.make_train_pipeline(..., sparse_inputs=...)`)."""
        sharded = gr_parallel.find_sharded_modules(self)
        jagged = features.to_dict()
        ids_per_key = dict(zip(features.keys(), features.length_per_key()))
        return {
            sharded[path]: _select(jagged, served, set(served), features.stride(), ids_per_key)
            for path, served in self._groups
            if path in sharded
        }

    def table_placement(self) -> dict[str, str]:
        """Where each table lives, by name: "sharded" (split over the ranks), "replicated" (whole on every rank
        of a sharded model) or "local" (unsharded model, one process)."""
        if not self.is_sharded:
            return dict.fromkeys(self._configs, "local")
        sharded_paths = set(gr_parallel.find_sharded_modules(self))
        sharded = {self._feature_to_table[f] for path, served in self._groups if path in sharded_paths for f in served}
        return {name: "sharded" if name in sharded else "replicated" for name in self._configs}

    def shard(self, device: torch.device) -> gr_parallel.EmbeddingSharding:
        """Shard the tables over the initialized world, in place (collective: every rank calls it alike).

        See `gr_models.modules.embedding_sharding` for what is sharded how.
        """
        from gr_models.modules.embedding_sharding import shard_tables

        if self.is_sharded:
            raise RuntimeError("these embedding tables are sharded already")
        model_parallel = [
            c
            for c in self._configs.values()
            if isinstance(c, ShardedEmbeddingConfig) and c.sharding_type == "model_parallel"
        ]
        sharding = shard_tables(self, model_parallel, device)
        self.is_sharded = True
        return sharding
