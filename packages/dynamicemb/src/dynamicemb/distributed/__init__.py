"""Row-wise sharding of dynamic tables in TorchRec: sharders, sharded collections, sharded dump/load."""

from dynamicemb.distributed.common import ShardedDynamicEmbModule
from dynamicemb.distributed.embedding import DynamicEmbeddingCollectionSharder, ShardedDynamicEmbeddingCollection
from dynamicemb.distributed.key_distribution import owner_ranks

__all__ = [
    "DynamicEmbeddingCollectionSharder",
    "ShardedDynamicEmbModule",
    "ShardedDynamicEmbeddingCollection",
    "owner_ranks",
]
