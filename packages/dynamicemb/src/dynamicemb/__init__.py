"""Hash-table embeddings that drop into TorchRec models.

Dynamic tables map any int64 id to an embedding row stored in a scored, bucketed hash table that
grows and evicts by score, keep rows in device memory, device + host memory or behind a device
cache, and train with fused optimizers applied in the backward pass.
"""

from dynamicemb.admission import AdmissionStrategy, Counter, FrequencyAdmissionStrategy, KVCounter

# Imported last: the TorchRec integration builds on everything above.
from dynamicemb.distributed import (
    DynamicEmbeddingBagCollectionSharder,
    DynamicEmbeddingCollectionSharder,
    ShardedDynamicEmbeddingBagCollection,
    ShardedDynamicEmbeddingCollection,
)
from dynamicemb.dump import DynamicEmbFileError
from dynamicemb.dump_load import DynamicEmbDump, DynamicEmbLoad, get_score, incremental_dump, set_score
from dynamicemb.embedding_table import DynamicEmbeddingTable
from dynamicemb.initializer import DynamicEmbInitializerArgs
from dynamicemb.lookup import dynamic_embedding_lookup
from dynamicemb.modules import DynamicEmbeddingBagCollection, DynamicEmbeddingCollection, DynamicEmbModule
from dynamicemb.optimizer import DynamicEmbOptimizerArgs, DynamicEmbOptimizerType
from dynamicemb.options import DynamicEmbTableOptions
from dynamicemb.planner import (
    DynamicEmbeddingEnumerator,
    DynamicEmbeddingShardingPlanner,
    DynamicEmbParameterConstraints,
    DynamicEmbParameterSharding,
    KeyDistribution,
)
from dynamicemb.storage import (
    PyDictStorage,
    RedisStorage,
    RocksDBStorage,
    Storage,
    StorageError,
    WriteBehindStorage,
)
from dynamicemb.storage.key_value_store import KeyValueTable
from dynamicemb.types import (
    DynamicEmbCheckMode,
    DynamicEmbEvictStrategy,
    DynamicEmbInitializerMode,
    DynamicEmbScoreStrategy,
)

__version__ = "0.1.0"

__all__ = [
    "AdmissionStrategy",
    "Counter",
    "DynamicEmbCheckMode",
    "DynamicEmbDump",
    "DynamicEmbEvictStrategy",
    "DynamicEmbFileError",
    "DynamicEmbInitializerArgs",
    "DynamicEmbInitializerMode",
    "DynamicEmbLoad",
    "DynamicEmbModule",
    "DynamicEmbOptimizerArgs",
    "DynamicEmbOptimizerType",
    "DynamicEmbParameterConstraints",
    "DynamicEmbParameterSharding",
    "DynamicEmbScoreStrategy",
    "DynamicEmbTableOptions",
    "DynamicEmbeddingBagCollection",
    "DynamicEmbeddingBagCollectionSharder",
    "DynamicEmbeddingCollection",
    "DynamicEmbeddingCollectionSharder",
    "DynamicEmbeddingEnumerator",
    "DynamicEmbeddingShardingPlanner",
    "DynamicEmbeddingTable",
    "FrequencyAdmissionStrategy",
    "KVCounter",
    "KeyDistribution",
    "KeyValueTable",
    "PyDictStorage",
    "RedisStorage",
    "RocksDBStorage",
    "ShardedDynamicEmbeddingBagCollection",
    "ShardedDynamicEmbeddingCollection",
    "Storage",
    "StorageError",
    "WriteBehindStorage",
    "__version__",
    "dynamic_embedding_lookup",
    "get_score",
    "incremental_dump",
    "set_score",
]
