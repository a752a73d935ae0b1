"""``DynamicEmbeddingCollection``: TorchRec's ``EmbeddingCollection`` backed by dynamic tables."""

from __future__ import annotations

import torch
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollectionInterface, get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

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

__all__ = ["DynamicEmbeddingCollection"]


class DynamicEmbeddingCollection(EmbeddingCollectionInterface, DynamicEmbModule):
    """Sequence (unpooled) embeddings of hash-table rows, a drop-in for ``torchrec.EmbeddingCollection``.

    ``DynamicEmbeddingCollection(tables=configs, device=device)`` takes the same TorchRec
    ``EmbeddingConfig`` list; ``num_embeddings`` sizes each table (the ids themselves may be any
    int64). The forward maps a ``KeyedJaggedTensor`` of ``F`` features to ``Dict[str,
    JaggedTensor]``: per feature, values ``[sum of its lengths, D]`` and the feature's lengths
    ``[B]`` (a feature shared by several tables is named ``"feature@table"``, as in TorchRec).

    The tables are not ``nn.Parameter``s: they are trained by a fused optimizer applied in the
    backward of the forward's output (``optimizer``: :class:`DynamicEmbOptimizerArgs` or TorchRec
    ``fused_params``; default TorchRec's fused default, SGD with learning rate 0.01), so a dense
    optimizer over ``model.parameters()`` leaves them alone. ``table_options``: one
    :class:`DynamicEmbTableOptions` for every table or a dict by table name. In ``train()`` mode
    new ids are inserted; in ``eval()`` mode nothing is inserted and unknown ids get the eval
    initializer's values (zeros). Dump/load with :func:`DynamicEmbDump` / :func:`DynamicEmbLoad`.

    Training it in a world of several processes raises ``RuntimeError`` (its tables would be silent,
    unsynchronized per-rank copies): shard it, or pass ``process_local=True`` to keep per-rank tables.
    """

    def __init__(
        self,
        tables: list[EmbeddingConfig],
        device: torch.device | None = None,
        need_indices: bool = False,
        *,
        table_options: TableOptionsArg = None,
        optimizer: OptimizerArg = None,
        process_local: bool = False,
    ) -> None:
        super().__init__()
        self.process_local = process_local
        self._embedding_configs = list(tables)
        self._device = torch.device("cpu") if device is None else torch.device(device)
        self._need_indices = need_indices
        self._tables = build_tables(self._embedding_configs, self._device, table_options, optimizer)
        self._embedding_names_by_table = get_embedding_names_by_table(self._embedding_configs)

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        check_not_a_silent_replica(self, self.process_local)
        ids = FeatureIds(features)
        out: dict[str, JaggedTensor] = {}
        for config, names in zip(self._embedding_configs, self._embedding_names_by_table):
            table = self._tables[config.name]
            table_ids = ids.table_ids(config.feature_names, self._device, table.options.index_type)
            embeddings = dynamic_embedding_lookup(table, table_ids, training=self.training)
            start = 0
            for feature, name in zip(config.feature_names, names):
                feature_ids = ids.ids(feature)
                stop = start + feature_ids.numel()
                out[name] = JaggedTensor(
                    values=embeddings[start:stop],
                    lengths=ids.feature_lengths(feature).to(self._device),
                    weights=feature_ids.to(self._device) if self._need_indices else None,
                )
                start = stop
        return out

    def dynamic_embedding_tables(self) -> dict[str, DynamicEmbeddingTable]:
        return dict(self._tables)

    def embedding_configs(self) -> list[EmbeddingConfig]:
        return self._embedding_configs

    def need_indices(self) -> bool:
        return self._need_indices

    def embedding_dim(self) -> int:
        return self._embedding_configs[0].embedding_dim

    def embedding_names_by_table(self) -> list[list[str]]:
        return self._embedding_names_by_table

    @property
    def device(self) -> torch.device:
        return self._device
