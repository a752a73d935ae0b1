"""Where value rows live: device memory, device + host memory, or a :class:`Storage` (a dict,
RocksDB on local disk, a Redis server, or the user's own).

Value stores (``value_store``: rows by slot; ``row_moves``/``row_kernels``: gathering and scattering
them), the key-value store over a hash index (``key_value_store``), the device cache in front of a
backing store (``cached_store``), and the external stores behind the :class:`Storage` interface."""

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
