"""Where value rows live: device memory, device + host memory, or a user's :class:`Storage`."""

from dynamicemb.storage.base import Storage
from dynamicemb.storage.dict_storage import PyDictStorage
from dynamicemb.storage.value_store import (
    DeviceValueStore,
    SplitValueStore,
    ValueStore,
    create_value_store,
    kernels_reach_pinned_memory,
    resize_value_store,
)

__all__ = [
    "DeviceValueStore",
    "PyDictStorage",
    "SplitValueStore",
    "Storage",
    "ValueStore",
    "create_value_store",
    "kernels_reach_pinned_memory",
    "resize_value_store",
]
