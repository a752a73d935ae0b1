"""``DynamicEmbeddingBagCollection``: TorchRec's ``EmbeddingBagCollection`` backed by dynamic tables."""

from __future__ import annotations

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface, get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dynamicemb.embedding_table import DynamicEmbeddingTable
from dynamicemb.lookup import dynamic_embedding_lookup
from dynamicemb.modules.common import (
    DynamicEmbModule,
    FeatureIds,
    OptimizerArg,
    TableOptionsArg,
    build_tables,
    check_not_a_silent_replica,
)
from dynamicemb.pooling import pool_bags

__all__ = ["DynamicEmbeddingBagCollection"]


class DynamicEmbeddingBagCollection(EmbeddingBagCollectionInterface, DynamicEmbModule):
    """Pooled embeddings of hash-table rows, a drop-in for ``torchrec.EmbeddingBagCollection``.

    Takes TorchRec ``EmbeddingBagConfig``s (pooling SUM or MEAN) and maps a ``KeyedJaggedTensor``
    (batch size ``B``) to a ``KeyedTensor`` of values ``[B, sum of D]`` (float32, like TorchRec),
    one key per feature in table order. With ``is_weighted`` each id's embedding is scaled by its
    KJT weight before pooling; MEAN divides by the bag length (empty bags give zeros).
    ``table_options``, ``optimizer`` and ``process_local`` as in
    :class:`DynamicEmbeddingCollection`.
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: torch.device | None = None,
        *,
        table_options: TableOptionsArg = None,
        optimizer: OptimizerArg = None,
        process_local: bool = False,
    ) -> None:
        super().__init__()
        self.process_local = process_local
        for config in tables:
            if config.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise ValueError(f"table {config.name!r}: pooling must be SUM or MEAN, got {config.pooling}")
        self._embedding_bag_configs = list(tables)
        self._is_weighted = is_weighted
        self._device = torch.device("cpu") if device is None else torch.device(device)
        self._tables = build_tables(self._embedding_bag_configs, self._device, table_options, optimizer)
        self._embedding_names_by_table = get_embedding_names_by_table(self._embedding_bag_configs)

    def _pool(self, ids: FeatureIds, config: EmbeddingBagConfig, embeddings: torch.Tensor) -> torch.Tensor:
        """``embeddings [N, D]`` of the table's features -> ``[F, B, D]`` float32 pooled per bag
        (one sequential sum per bag when the table is deterministic)."""
        features = config.feature_names
        lengths = torch.cat([ids.feature_lengths(f) for f in features]).to(self._device)
        weights = None
        if self._is_weighted:
            weights = torch.cat([ids.feature_weights(f) for f in features]).to(self._device)
        deterministic = self._tables[config.name].deterministic
        pooled = pool_bags(embeddings, lengths, weights, config.pooling, deterministic)
        return pooled.view(len(features), ids.batch_size, config.embedding_dim)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        check_not_a_silent_replica(self, self.process_local)
        ids = FeatureIds(features)
        pooled: list[torch.Tensor] = []
        for config in self._embedding_bag_configs:
            table = self._tables[config.name]
            table_ids = ids.table_ids(config.feature_names, self._device, table.options.index_type)
            embeddings = dynamic_embedding_lookup(table, table_ids, training=self.training)
            pooled.extend(self._pool(ids, config, embeddings).unbind(0))
        names = [name for names in self._embedding_names_by_table for name in names]
        dims = [config.embedding_dim for config in self._embedding_bag_configs for _ in config.feature_names]
        return KeyedTensor(keys=names, length_per_key=dims, values=torch.cat(pooled, dim=1), key_dim=1)

    def dynamic_embedding_tables(self) -> dict[str, DynamicEmbeddingTable]:
        return dict(self._tables)

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return self._device
