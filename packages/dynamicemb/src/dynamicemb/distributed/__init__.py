"""Row-wise sharding of dynamic tables in TorchRec: sharders and sharded collections.

Dump and load sharded tables with :func:`dynamicemb.DynamicEmbDump` / :func:`dynamicemb.DynamicEmbLoad`
(collective on a sharded model); their collective implementation is :mod:`dynamicemb.distributed.checkpoint`.
"""

from dynamicemb.distributed.checkpoint import find_sharded_modules
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
    "find_sharded_modules",
    "owner_ranks",
]
