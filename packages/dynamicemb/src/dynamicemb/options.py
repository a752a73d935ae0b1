"""Per-table configuration: :class:`DynamicEmbTableOptions`."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from dynamicemb.admission import AdmissionStrategy, Counter
from dynamicemb.initializer import DynamicEmbInitializerArgs
from dynamicemb.storage.base import Storage
from dynamicemb.types import (
    DynamicEmbCheckMode,
    DynamicEmbInitializerMode,
    DynamicEmbScoreStrategy,
)

__all__ = ["DynamicEmbTableOptions", "options_to_json"]


def _zeros() -> DynamicEmbInitializerArgs:
    return DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.CONSTANT, value=0.0)


@dataclass
class DynamicEmbTableOptions:
    """How one dynamic table stores, evicts, initializes and checks its rows.

    training: allocate optimizer state beside each embedding (``value = [embedding | state]``).
        ``False`` stores embeddings only, for inference; a stateful optimizer is then refused.
        Whether keys are inserted follows the module's ``train()``/``eval()`` mode.
    initializer_args: fills the embedding of a key seen for the first time in training.
    eval_initializer_args: the embedding returned in eval mode for a key not in the table
        (zeros by default); eval mode never inserts.
    caching: ``False``: one table whose value rows are split between device memory (the first
        ``global_hbm_for_values`` bytes of rows) and host memory. ``True``: a device table used as
        a cache (its capacity set by ``global_hbm_for_values``) in front of a host table; rows the
        cache evicts are written back to the host table.
    init_capacity: slots allocated at the start (rounded up to a power of two, at least one
        bucket); the table doubles when its load factor passes ``max_load_factor``, up to
        ``max_capacity``. ``None``: start at ``max_capacity``.
    max_capacity: slots of the table (one shard of it when sharded). ``None``: inferred from the
        TorchRec config's ``num_embeddings`` (and the world size when sharded), rounded up to a
        power of two and at least ``bucket_capacity``.
    max_load_factor: load factor that triggers doubling.
    score_strategy: how scores are set; the lowest score of a full bucket is evicted. Also
        accepts a :class:`DynamicEmbEvictStrategy` alias (``LRU`` is ``TIMESTAMP``).
    bucket_capacity: slots per bucket; a key lives in exactly one bucket.
    safe_check_mode: ignore / warn / error when keys of a batch could not be stored.
    global_hbm_for_values: bytes of device memory for value rows (embedding + optimizer state).
        ``caching=False``: rows beyond this budget live in host memory (0 = all in host memory).
        ``caching=True``: the size of the device cache.
    external_storage: a :class:`~dynamicemb.storage.Storage` holding the rows behind a device
        cache (sized by ``global_hbm_for_values``; the whole table if that is 0) instead of the
        built-in host table; with ``caching=True``, behind the host table (device cache -> host
        table -> storage, e.g. :class:`~dynamicemb.storage.RocksDBStorage` on local disk).
    index_type: dtype the ids must have (``torch.int64`` or ``torch.int32``); ``None`` accepts
        either. Keys are stored as int64.
    admit_strategy: decides which new keys enter the table (e.g. ``FrequencyAdmissionStrategy``);
        keys not admitted get initializer values in forward, are not stored, get no update.
    admission_counter: the counter table the admission strategy reads; ``None`` creates a
        built-in ``KVCounter`` of the table's capacity.
    warm_up_kernels: on a GPU, compile the hash index's Triton kernels (lookup, insertion,
        eviction, rehash) when the table is created, so the first full bucket does not pause
        training for a compilation. Nothing happens on the CPU or under ``TRITON_INTERPRET=1``.
    deterministic: the same results run to run on one device, whatever the order of the ids of a
        batch: gradients of duplicate ids summed in a fixed order, bags pooled by sequential sums,
        new keys placed in an order that depends only on the table and the keys (slower; see
        :mod:`dynamicemb.deterministic`). ``None``: follow ``torch.use_deterministic_algorithms``.
    """

    training: bool = True
    initializer_args: DynamicEmbInitializerArgs = field(default_factory=DynamicEmbInitializerArgs)
    eval_initializer_args: DynamicEmbInitializerArgs = field(default_factory=_zeros)
    caching: bool = False
    init_capacity: int | None = None
    max_capacity: int | None = None
    max_load_factor: float = 0.5
    score_strategy: DynamicEmbScoreStrategy = DynamicEmbScoreStrategy.TIMESTAMP
    bucket_capacity: int = 128
    safe_check_mode: DynamicEmbCheckMode = DynamicEmbCheckMode.IGNORE
    global_hbm_for_values: int = 0
    external_storage: Storage | None = None
    index_type: torch.dtype | None = None
    admit_strategy: AdmissionStrategy | None = None
    admission_counter: Counter | None = None
    warm_up_kernels: bool = True
    deterministic: bool | None = None

    def __post_init__(self) -> None:
        self.score_strategy = DynamicEmbScoreStrategy(int(self.score_strategy))
        self.safe_check_mode = DynamicEmbCheckMode(int(self.safe_check_mode))
        if self.bucket_capacity <= 0 or self.bucket_capacity & (self.bucket_capacity - 1):
            raise ValueError(f"bucket_capacity must be a positive power of two, got {self.bucket_capacity}")
        if not 0.0 < self.max_load_factor <= 1.0:
            raise ValueError(f"max_load_factor must be in (0, 1], got {self.max_load_factor}")
        if self.global_hbm_for_values < 0:
            raise ValueError(f"global_hbm_for_values must be >= 0 bytes, got {self.global_hbm_for_values}")
        for name in ("init_capacity", "max_capacity"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.index_type not in (None, torch.int64, torch.int32):
            raise ValueError(f"index_type must be torch.int64 or torch.int32, got {self.index_type}")


def _to_json_value(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    describe = getattr(value, "describe", None)
    if callable(describe):
        return describe()
    return {"type": type(value).__name__}


def options_to_json(options: DynamicEmbTableOptions) -> dict[str, Any]:
    """The options as JSON-compatible values (enums by name; objects by their ``describe()`` or type)."""
    return {f.name: _to_json_value(getattr(options, f.name)) for f in dataclasses.fields(options)}
