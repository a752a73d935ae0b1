"""``DynamicEmbParameterConstraints``: TorchRec parameter constraints that can mark a table dynamic."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType

from dynamicemb.distributed.parameter_sharding import KeyDistribution
from dynamicemb.options import DynamicEmbTableOptions, options_to_json

__all__ = ["DynamicEmbParameterConstraints"]

_ROW_WISE = ShardingType.ROW_WISE.value
_CUSTOMIZED = EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value


@dataclass
class DynamicEmbParameterConstraints(ParameterConstraints):
    """TorchRec ``ParameterConstraints`` plus the dynamic-table switch.

    use_dynamicemb: plan this table as a dynamic (hash-table) table: sharded row-wise over every
        rank, keys assigned to ranks by ``key_distribution``. ``False``: an ordinary TorchRec
        table planned by TorchRec with the other fields.
    dynamicemb_options: the table's :class:`~dynamicemb.DynamicEmbTableOptions`; its
        ``max_capacity`` (slots per shard) is inferred from ``num_embeddings`` and the world size
        when left ``None``.
    key_distribution: :class:`~dynamicemb.planner.KeyDistribution` (HASH by default).

    A dynamic table accepts ``sharding_types`` ``None`` or ``[ROW_WISE]`` and ``compute_kernels``
    ``None`` or ``[CUSTOMIZED_KERNEL]``; anything else raises ``ValueError`` here.
    """

    use_dynamicemb: bool = False
    dynamicemb_options: DynamicEmbTableOptions = field(default_factory=DynamicEmbTableOptions)
    key_distribution: KeyDistribution = KeyDistribution.HASH

    def __post_init__(self) -> None:
        self.key_distribution = KeyDistribution(self.key_distribution)
        if not self.use_dynamicemb:
            return
        if self.sharding_types is not None and list(self.sharding_types) != [_ROW_WISE]:
            raise ValueError(
                f"a dynamic table (use_dynamicemb=True) is sharded row-wise only: sharding_types must be "
                f"None or [{_ROW_WISE!r}], got {self.sharding_types}"
            )
        if self.compute_kernels is not None and list(self.compute_kernels) != [_CUSTOMIZED]:
            raise ValueError(
                f"a dynamic table (use_dynamicemb=True) is computed by dynamicemb: compute_kernels must be "
                f"None or [{_CUSTOMIZED!r}], got {self.compute_kernels}"
            )
        if not isinstance(self.dynamicemb_options, DynamicEmbTableOptions):
            raise TypeError(
                f"dynamicemb_options must be a DynamicEmbTableOptions, got {type(self.dynamicemb_options).__name__}"
            )

    def __hash__(self) -> int:
        options = json.dumps(options_to_json(self.dynamicemb_options), sort_keys=True, default=str)
        return hash((super().__hash__(), self.use_dynamicemb, options, self.key_distribution))
