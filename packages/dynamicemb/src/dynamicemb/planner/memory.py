"""Per-shard capacity and memory of a row-wise sharded dynamic table.

One shard of a table with ``C`` slots (``shard_capacity``) and value rows of ``V`` columns
(embedding ``dim`` + optimizer state, stored together) of ``b`` bytes per element holds:

- its hash index on the compute device: ``C * 21`` bytes (int64 key, int64 score, uint8 digest and
  int32 epoch per slot; :mod:`dynamicemb.hash_index.layout`) + an 8-byte counter;
- its value rows, ``C * V * b`` bytes:

  * ``caching=False``, no external storage: the first ``hbm`` bytes of rows on the device, the
    rest in host memory, where ``hbm = ceil(global_hbm_for_values / world_size)``; ``hbm = 0``
    puts every row in host memory;
  * ``caching=True``: a device cache of ``K = min(max(2^floor(log2(hbm / (V * b))),
    bucket_capacity), C)`` slots (index + rows on the device) in front of a table of ``C`` slots
    whose index is on the device and whose rows are in host memory;
  * ``external_storage``: the same device cache (``K = C`` when ``hbm = 0``) in front of the
    user's store, whose memory is not counted here; with ``caching=True`` too, the host table of
    ``C`` slots sits between the cache and the store;

- with an admission strategy and no user counter, a counter table of ``C`` slots on the device
  (index + one int64 count per slot).

On a CPU compute device the "device" is host memory. The planner counts every shard at its full
``C`` slots: tables grow by doubling up to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torchrec.modules.embedding_configs import BaseEmbeddingConfig, DataType

from dynamicemb.distributed.parameter_sharding import shard_capacity
from dynamicemb.optimizer import DynamicEmbOptimizerArgs
from dynamicemb.options import DynamicEmbTableOptions

__all__ = [
    "INDEX_BYTES_PER_SLOT",
    "DynamicTableMemory",
    "dynamic_table_memory",
]

INDEX_BYTES_PER_SLOT = 8 + 8 + 1 + 4
_INDEX_FIXED_BYTES = 8
_COUNT_BYTES = 8
_ELEMENT_BYTES = {DataType.FP32: 4, DataType.FP16: 2, DataType.BF16: 2}


def _index_bytes(slots: int) -> int:
    return slots * INDEX_BYTES_PER_SLOT + _INDEX_FIXED_BYTES


def _floor_power_of_two(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


@dataclass(frozen=True)
class DynamicTableMemory:
    """Memory of one shard of a dynamic table, in bytes (see the module docstring)."""

    table: str
    shard_capacity: int
    value_dim: int
    index_bytes: int
    value_device_bytes: int
    value_host_bytes: int
    cache_bytes: int
    counter_bytes: int
    compute_on_device: bool

    @property
    def device_bytes(self) -> int:
        """Bytes in the compute device's memory (HBM on a GPU)."""
        on_device = self.index_bytes + self.value_device_bytes + self.cache_bytes + self.counter_bytes
        return on_device if self.compute_on_device else 0

    @property
    def host_bytes(self) -> int:
        """Bytes in host memory (everything when the compute device is the CPU)."""
        if self.compute_on_device:
            return self.value_host_bytes
        return (
            self.index_bytes + self.value_device_bytes + self.value_host_bytes + self.cache_bytes + self.counter_bytes
        )

    @property
    def total_bytes(self) -> int:
        return self.device_bytes + self.host_bytes


def dynamic_table_memory(
    config: BaseEmbeddingConfig,
    options: DynamicEmbTableOptions,
    optimizer: DynamicEmbOptimizerArgs,
    world_size: int,
    compute_device: str,
) -> DynamicTableMemory:
    """Memory of one of the ``world_size`` shards of table ``config`` on ``compute_device``
    (``"cuda"``, ``"cpu"``, ...)."""
    if config.data_type not in _ELEMENT_BYTES:
        raise TypeError(f"table {config.name!r}: data_type {config.data_type} is not supported (FP32, FP16, BF16)")
    capacity = shard_capacity(config.num_embeddings, options, world_size)
    state_dim = optimizer.state_dim(config.embedding_dim) if options.training else 0
    value_dim = config.embedding_dim + state_dim
    row_bytes = value_dim * _ELEMENT_BYTES[config.data_type]
    hbm = math.ceil(options.global_hbm_for_values / world_size)
    on_device = compute_device in ("cuda", "mtia")
    cache_bytes = 0
    if not options.caching and options.external_storage is None:
        device_rows = capacity if not on_device else min(hbm // row_bytes, capacity)
        value_device, value_host = device_rows * row_bytes, (capacity - device_rows) * row_bytes
        index = _index_bytes(capacity)
    else:
        if hbm:
            cache_slots = min(max(_floor_power_of_two(hbm // row_bytes), options.bucket_capacity), capacity)
        elif options.external_storage is not None:
            cache_slots = capacity
        else:
            raise ValueError(
                f"table {config.name!r}: caching=True needs global_hbm_for_values > 0 (the bytes of the device cache)"
            )
        cache_bytes = _index_bytes(cache_slots) + cache_slots * row_bytes
        value_device = 0
        if options.caching:
            index, value_host = _index_bytes(capacity), capacity * row_bytes
        else:
            index, value_host = 0, 0
    counter = 0
    if options.admit_strategy is not None and options.admission_counter is None:
        counter = _index_bytes(capacity) + capacity * _COUNT_BYTES
    return DynamicTableMemory(
        table=config.name,
        shard_capacity=capacity,
        value_dim=value_dim,
        index_bytes=index,
        value_device_bytes=value_device,
        value_host_bytes=value_host,
        cache_bytes=cache_bytes,
        counter_bytes=counter,
        compute_on_device=on_device,
    )
