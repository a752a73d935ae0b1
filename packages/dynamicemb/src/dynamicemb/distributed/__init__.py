"""Row-wise sharding of dynamic tables in TorchRec: sharders, sharded collections, sharded dump/load."""

from dynamicemb.distributed.checkpoint import (
    dump_sharded,
    find_sharded_modules,
    get_sharded_score,
    incremental_dump_sharded,
    load_sharded,
    set_sharded_score,
)
from dynamicemb.distributed.common import ShardedDynamicEmbModule
from dynamicemb.distributed.embedding import DynamicEmbeddingCollectionSharder, ShardedDynamicEmbeddingCollection
from dynamicemb.distributed.embeddingbag import (
    DynamicEmbeddingBagCollectionSharder,
    ShardedDynamicEmbeddingBagCollection,
)
from dynamicemb.distributed.key_distribution import owner_ranks

__all__ = [
    "DynamicEmbeddingBagCollectionSharder",
    "DynamicEmbeddingCollectionSharder",
    "ShardedDynamicEmbModule",
    "ShardedDynamicEmbeddingBagCollection",
    "ShardedDynamicEmbeddingCollection",
    "dump_sharded",
    "find_sharded_modules",
    "get_sharded_score",
    "incremental_dump_sharded",
    "load_sharded",
    "owner_ranks",
    "set_sharded_score",
]
