"""Where value rows live: device memory, device + host memory, or a :class:`Storage` (a dict,
RocksDB on local disk, a Redis server, or the user's own)."""

from dynamicemb.storage.base import Storage
from dynamicemb.storage.dict_storage import PyDictStorage
from dynamicemb.storage.redis_storage import RedisStorage
from dynamicemb.storage.rocksdb_storage import RocksDBStorage
from dynamicemb.storage.row_codec import StorageError
from dynamicemb.storage.value_store import (
    DeviceValueStore,
    SplitValueStore,
    ValueStore,
    create_value_store,
    kernels_reach_pinned_memory,
    resize_value_store,
)
from dynamicemb.storage.write_behind import WriteBehindStorage

__all__ = [
    "DeviceValueStore",
    "PyDictStorage",
    "RedisStorage",
    "RocksDBStorage",
    "SplitValueStore",
    "Storage",
    "StorageError",
    "ValueStore",
    "WriteBehindStorage",
    "create_value_store",
    "kernels_reach_pinned_memory",
    "resize_value_store",
]
