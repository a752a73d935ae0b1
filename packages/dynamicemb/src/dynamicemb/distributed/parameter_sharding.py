"""The plan entry of a dynamic table, the rule that assigns its keys to ranks, and the size of a shard."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field

from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.types import ParameterSharding, ShardingType

from dynamicemb.embedding_table import infer_max_capacity
from dynamicemb.hash_index.layout import next_power_of_two
from dynamicemb.options import DynamicEmbTableOptions

__all__ = ["DynamicEmbParameterSharding", "KeyDistribution", "shard_capacity", "shard_table_options"]


class KeyDistribution(enum.Enum):
    """Which rank owns a key of a row-wise sharded dynamic table (``W`` ranks).

    HASH: ``rank = fmix64(key XOR 0x9E3779B97F4A7C15) mod W`` (the 64-bit hash taken as unsigned
        after clearing its top bit). Balanced for any id distribution; the salt makes the rank
        independent of the bits that pick a key's bucket inside the shard's hash table.
    MODULO: ``rank = key mod W`` (non-negative remainder), i.e. consecutive ids go round-robin
        over the ranks. Balanced for dense ids; predictable placement.

    A dump records only keys, so it loads at any world size under either rule: each rank keeps
    the rows it owns under the rule and world size of the loading job.
    """

    HASH = "hash"
    MODULO = "modulo"


@dataclass
class DynamicEmbParameterSharding(ParameterSharding):
    """A TorchRec ``ParameterSharding`` for a dynamic table: row-wise over ``ranks``, computed by
    dynamicemb (``compute_kernel`` is ``EmbeddingComputeKernel.CUSTOMIZED_KERNEL``).

    dynamicemb_options: the table's options as the user gave them (whole-table view:
        ``global_hbm_for_values`` is the budget of all shards together).
    key_distribution: which rank owns which key (:class:`KeyDistribution`).
    shard_capacity: slots of the hash table of each shard (a power of two, at least one bucket).
    shard_device_bytes / shard_host_bytes: the planner's estimate of one shard's memory on the
        compute device and in host memory (see :mod:`dynamicemb.planner.memory`).
    """

    dynamicemb_options: DynamicEmbTableOptions = field(default_factory=DynamicEmbTableOptions)
    key_distribution: KeyDistribution = KeyDistribution.HASH
    shard_capacity: int = 0
    shard_device_bytes: int = 0
    shard_host_bytes: int = 0

    def __post_init__(self) -> None:
        self.key_distribution = KeyDistribution(self.key_distribution)
        if self.sharding_type != ShardingType.ROW_WISE.value:
            raise ValueError(f"dynamic tables are sharded row-wise only, got sharding_type {self.sharding_type!r}")
        if self.compute_kernel != EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value:
            raise ValueError(
                f"a dynamic table's compute_kernel must be {EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value!r}, "
                f"got {self.compute_kernel!r}"
            )


def shard_capacity(num_embeddings: int, options: DynamicEmbTableOptions, world_size: int) -> int:
    """Slots of one shard: ``options.max_capacity`` if set, else ``num_embeddings / world_size``;
    rounded up to a power of two of at least ``bucket_capacity`` slots."""
    if world_size <= 0:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if options.max_capacity is not None:
        return next_power_of_two(max(options.max_capacity, options.bucket_capacity))
    return infer_max_capacity(num_embeddings, options.bucket_capacity, world_size)


def shard_table_options(
    num_embeddings: int, options: DynamicEmbTableOptions, world_size: int
) -> DynamicEmbTableOptions:
    """The options of one shard: ``max_capacity`` = :func:`shard_capacity` and
    ``global_hbm_for_values`` = this shard's part of the table's budget (``ceil(budget / world_size)``)."""
    return dataclasses.replace(
        options,
        max_capacity=shard_capacity(num_embeddings, options, world_size),
        global_hbm_for_values=math.ceil(options.global_hbm_for_values / world_size),
    )
