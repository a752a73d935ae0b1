"""Planning dynamic tables with TorchRec: constraints, enumerator, planner, memory accounting."""

from dynamicemb.distributed.parameter_sharding import (
    DynamicEmbParameterSharding,
    KeyDistribution,
    shard_capacity,
    shard_table_options,
)
from dynamicemb.planner.constraints import DynamicEmbParameterConstraints
from dynamicemb.planner.enumerator import DynamicEmbeddingEnumerator
from dynamicemb.planner.memory import DynamicTableMemory, dynamic_table_memory
from dynamicemb.planner.planner import DynamicEmbeddingShardingPlanner

__all__ = [
    "DynamicEmbParameterConstraints",
    "DynamicEmbParameterSharding",
    "DynamicEmbeddingEnumerator",
    "DynamicEmbeddingShardingPlanner",
    "DynamicTableMemory",
    "KeyDistribution",
    "dynamic_table_memory",
    "shard_capacity",
    "shard_table_options",
]
