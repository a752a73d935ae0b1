"""One dynamic embedding table: its storage tiers, fused optimizer, scores, admission and checks."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dynamicemb.admission import KVCounter
from dynamicemb.deterministic import is_deterministic
from dynamicemb.hash_index.layout import next_power_of_two
from dynamicemb.initializer import DynamicEmbInitializerArgs, EmbeddingInitializer
from dynamicemb.masks import positions
from dynamicemb.optimizer import DynamicEmbOptimizerArgs, FusedOptimizer
from dynamicemb.options import DynamicEmbTableOptions
from dynamicemb.storage.cached_store import CachedKeyValueTable
from dynamicemb.storage.key_value_store import KeyValueTable, TrainingLookup
from dynamicemb.types import DynamicEmbCheckMode, DynamicEmbScoreStrategy

__all__ = ["DynamicEmbeddingTable", "LookupHandle", "infer_max_capacity"]


def infer_max_capacity(num_embeddings: int, bucket_capacity: int, world_size: int = 1) -> int:
    """Slots of one shard: ``num_embeddings / world_size`` rounded up to a power of two, at least one bucket."""
    per_shard = -(-num_embeddings // world_size)
    return next_power_of_two(max(per_shard, bucket_capacity))


def _floor_power_of_two(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


_warned_rows_in_host_memory = False


def warn_if_rows_in_host_memory(name: str, device: torch.device, options: DynamicEmbTableOptions) -> None:
    """Once per process: a table on a GPU whose value rows all live in host memory because
    ``global_hbm_for_values`` was left at 0 (every lookup then reads its rows over the bus)."""
    global _warned_rows_in_host_memory
    plain = not options.caching and options.external_storage is None
    if _warned_rows_in_host_memory or device.type != "cuda" or options.global_hbm_for_values or not plain:
        return
    _warned_rows_in_host_memory = True
    warnings.warn(
        f"dynamic table {name!r} is on {device} but keeps every value row in host memory: "
        "global_hbm_for_values is 0; set it to the bytes of device memory for rows (embedding + optimizer "
        "state) to keep them on the GPU (this warning is given once)",
        RuntimeWarning,
        stacklevel=4,
    )


@dataclass
class LookupHandle:
    """A training lookup, kept for the backward: ``positions`` of the stored keys among the unique
    keys of the batch (``None``: all of them)."""

    lookup: TrainingLookup
    positions: torch.Tensor | None


class DynamicEmbeddingTable:
    """A hash-table embedding of ``dim`` columns with a fused optimizer.

    The batch-level API works on *unique* int64 keys ``[U]`` on :attr:`device`:
    :meth:`lookup` (training: find or insert; eval: find only) returns ``[U, dim]`` embeddings and
    a handle, and :meth:`apply_gradients` takes the handle and the summed gradients ``[U, dim]``.
    ``num_embeddings`` is the TorchRec config's row count (it sizes the table when
    ``options.max_capacity`` is ``None`` and bounds UNIFORM/TRUNCATED_NORMAL initializers).
    ``hash_backend``: the index implementation (``"auto"``: Triton on CUDA, torch elsewhere).
    """

    def __init__(
        self,
        *,
        name: str,
        dim: int,
        num_embeddings: int,
        options: DynamicEmbTableOptions | None = None,
        optimizer: DynamicEmbOptimizerArgs | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        hash_backend: str = "auto",
    ) -> None:
        self.name = name
        self.hash_backend = hash_backend
        self.dim = dim
        self.num_embeddings = num_embeddings
        self.options = options = options if options is not None else DynamicEmbTableOptions()
        self.dtype = dtype
        self.device = _resolve_device(device, name)
        if dim <= 0 or num_embeddings <= 0:
            raise ValueError(f"table {name!r}: dim and num_embeddings must be positive, got {dim}, {num_embeddings}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"table {name!r}: embeddings must be float32, float16 or bfloat16, got {dtype}")
        self.optimizer = FusedOptimizer(optimizer if optimizer is not None else DynamicEmbOptimizerArgs(), dim)
        if not options.training and self.optimizer.state_dim:
            raise ValueError(
                f"table {name!r}: optimizer {self.optimizer.args.optimizer.name} keeps state but "
                "options.training is False (no room for optimizer state); use SGD or training=True"
            )
        self.value_dim = dim + self.optimizer.state_dim
        self.max_capacity = options.max_capacity or infer_max_capacity(num_embeddings, options.bucket_capacity)
        init = options.init_capacity or self.max_capacity
        self.init_capacity = min(next_power_of_two(max(init, options.bucket_capacity)), self.max_capacity)

        def make_initializer(args: DynamicEmbInitializerArgs) -> EmbeddingInitializer:
            return EmbeddingInitializer(args, dim=dim, num_embeddings=num_embeddings, dtype=dtype, device=self.device)

        self.initializer = make_initializer(options.initializer_args)
        self.eval_initializer = make_initializer(options.eval_initializer_args)
        self.admission = options.admit_strategy
        self.counter = None
        self.rejected_initializer = self.initializer
        if self.admission is not None:
            self.counter = options.admission_counter or KVCounter(
                self.max_capacity,
                options.bucket_capacity,
                device=self.device,
                backend=hash_backend,
                deterministic=options.deterministic,
            )
            rejected_args = self.admission.initializer_args()
            if rejected_args is not None:
                self.rejected_initializer = make_initializer(rejected_args)
        self.store = self._build_store()
        self.score_step = 0
        self._custom_score = 0
        self._last_timestamp = 0

    # --- construction -----------------------------------------------------------------------
    def new_rows(self, n: int) -> torch.Tensor:
        """``[n, value_dim]`` rows for new keys: initializer embeddings and initial optimizer state."""
        state = self.optimizer.initial_state(n, self.dtype, self.device)
        return torch.cat([self.initializer(n), state], dim=1)

    def _key_value_table(
        self,
        *,
        capacity: tuple[int, int],
        max_load_factor: float,
        score_strategy: DynamicEmbScoreStrategy,
        device_budget_bytes: int | None,
    ) -> KeyValueTable:
        return KeyValueTable(
            dim=self.dim,
            value_dim=self.value_dim,
            dtype=self.dtype,
            device=self.device,
            init_capacity=capacity[0],
            max_capacity=capacity[1],
            bucket_capacity=self.options.bucket_capacity,
            max_load_factor=max_load_factor,
            score_strategy=score_strategy,
            device_budget_bytes=device_budget_bytes,
            new_rows=self.new_rows,
            hash_backend=self.hash_backend,
            warm_up_kernels=self.options.warm_up_kernels,
            deterministic=self.options.deterministic,
        )

    def _build_store(self) -> KeyValueTable | CachedKeyValueTable:
        options = self.options
        strategy = options.score_strategy
        capacity = (self.init_capacity, self.max_capacity)
        host_only = None if self.device.type == "cpu" else 0
        warn_if_rows_in_host_memory(self.name, self.device, options)
        if not options.caching and options.external_storage is None:
            return self._key_value_table(
                capacity=capacity,
                max_load_factor=options.max_load_factor,
                score_strategy=strategy,
                device_budget_bytes=options.global_hbm_for_values or host_only,
            )
        row_bytes = self.value_dim * self.dtype.itemsize
        if options.global_hbm_for_values:
            cache_rows = _floor_power_of_two(options.global_hbm_for_values // row_bytes)
            cache_capacity = min(max(cache_rows, options.bucket_capacity), self.max_capacity)
        elif options.external_storage is not None:
            cache_capacity = self.max_capacity
        else:
            raise ValueError(
                f"table {self.name!r}: caching=True needs global_hbm_for_values > 0 (the bytes of the device cache)"
            )
        no_eviction = strategy is DynamicEmbScoreStrategy.NO_EVICTION
        cache = self._key_value_table(
            capacity=(cache_capacity, cache_capacity),
            max_load_factor=1.0,
            score_strategy=DynamicEmbScoreStrategy.TIMESTAMP if no_eviction else strategy,
            device_budget_bytes=None,
        )
        if not options.caching:
            assert options.external_storage is not None  # caching or external storage brought us here
            return CachedKeyValueTable(cache, options.external_storage)
        host_table = self._key_value_table(
            capacity=capacity,
            max_load_factor=options.max_load_factor,
            score_strategy=strategy,
            device_budget_bytes=host_only,
        )
        if options.external_storage is None:
            return CachedKeyValueTable(cache, host_table)
        # Three tiers: device cache -> host table -> external storage (e.g. RocksDB on local disk).
        return CachedKeyValueTable(cache, CachedKeyValueTable(host_table, options.external_storage))

    # --- scores -----------------------------------------------------------------------------
    def _scores(self, n: int) -> torch.Tensor | None:
        """Scores for the keys of a training lookup (``None``: LFU, counted by the index)."""
        strategy = self.options.score_strategy
        if strategy is DynamicEmbScoreStrategy.LFU:
            return None
        if strategy is DynamicEmbScoreStrategy.STEP:
            value = self.score_step
        elif strategy is DynamicEmbScoreStrategy.CUSTOMIZED:
            value = self._custom_score
        else:
            value = self._last_timestamp = max(time.time_ns(), self._last_timestamp + 1)
        return torch.full((n,), value, dtype=torch.int64, device=self.device)

    def get_score(self) -> int | None:
        """A score no larger than any score the next training lookup assigns (the threshold for an
        :func:`~dynamicemb.incremental_dump` of keys touched from now on); ``None`` for LFU.

        TIMESTAMP / NO_EVICTION: wall-clock nanoseconds; STEP: the next step; CUSTOMIZED: the set score.
        """
        strategy = self.options.score_strategy
        if strategy is DynamicEmbScoreStrategy.LFU:
            return None
        if strategy is DynamicEmbScoreStrategy.STEP:
            return self.score_step + 1
        if strategy is DynamicEmbScoreStrategy.CUSTOMIZED:
            return self._custom_score
        return max(time.time_ns(), self._last_timestamp + 1)

    def set_score(self, score: int) -> None:
        """The score of the keys of the following training lookups (CUSTOMIZED tables only)."""
        if self.options.score_strategy is not DynamicEmbScoreStrategy.CUSTOMIZED:
            raise ValueError(
                f"table {self.name!r}: set_score needs score_strategy CUSTOMIZED, "
                f"the table uses {self.options.score_strategy.name}"
            )
        self._custom_score = int(score)

    def score_clock(self) -> int:
        """Where the table's score source stands (STEP: the step; CUSTOMIZED: the set score;
        TIMESTAMP / NO_EVICTION: the last timestamp given; LFU: 0); saved in dumps."""
        strategy = self.options.score_strategy
        if strategy is DynamicEmbScoreStrategy.STEP:
            return self.score_step
        if strategy is DynamicEmbScoreStrategy.CUSTOMIZED:
            return self._custom_score
        if strategy is DynamicEmbScoreStrategy.LFU:
            return 0
        return self._last_timestamp

    def restore_score_clock(self, clock: int) -> None:
        """Continue from a dumped :meth:`score_clock`, so keys touched after a load score at least
        as high as the loaded ones."""
        strategy = self.options.score_strategy
        if strategy is DynamicEmbScoreStrategy.STEP:
            self.score_step = max(self.score_step, clock)
        elif strategy is DynamicEmbScoreStrategy.CUSTOMIZED:
            self._custom_score = clock
        elif strategy is not DynamicEmbScoreStrategy.LFU:
            self._last_timestamp = max(self._last_timestamp, clock)

    # --- lookup and update --------------------------------------------------------------------
    @property
    def deterministic(self) -> bool:
        """Whether the table runs in deterministic mode now (``options.deterministic``, or torch's
        global setting when that is ``None``; see :mod:`dynamicemb.deterministic`)."""
        return is_deterministic(self.options.deterministic)

    @property
    def needs_counts(self) -> bool:
        """Whether :meth:`lookup` wants the occurrence count of each unique key (admission)."""
        return self.admission is not None

    def lookup(
        self, keys: torch.Tensor, counts: torch.Tensor | None = None, *, training: bool
    ) -> tuple[torch.Tensor, LookupHandle | None]:
        """Unique ``keys [U]`` int64 -> ``(embeddings [U, dim], handle)``.

        Training inserts missing keys (or admits them, with an admission strategy) and returns a
        handle for :meth:`apply_gradients`; eval never inserts and returns the eval initializer's
        values (zeros by default) for missing keys, and no handle. ``counts [U]`` (occurrences of
        each key in the batch) is required when :attr:`needs_counts`.
        """
        if not training:
            values, found = self.store.find(keys, self.dim)
            return torch.where(found.unsqueeze(1), values, self.eval_initializer(keys.numel())), None
        self.score_step += 1
        if self.admission is not None:
            if counts is None:
                raise ValueError(f"table {self.name!r} has an admission strategy: lookup needs counts [U]")
            return self._lookup_with_admission(keys, counts)
        lookup = self.store.lookup_for_training(keys, self._scores(keys.numel()))
        self._check_lost(lookup.num_lost, keys.numel())
        return lookup.embeddings, LookupHandle(lookup, None)

    def _lookup_with_admission(self, keys: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, LookupHandle]:
        assert self.admission is not None and self.counter is not None
        present = self.store.contains(keys)
        missing = positions(~present)
        missing_keys = keys[missing]
        frequencies = self.counter.add(missing_keys, counts[missing]).to(self.device)
        admitted = self.admission.admit(missing_keys, frequencies).to(self.device)
        self.counter.erase(missing_keys[admitted])
        admit_mask = present.clone()
        admit_mask[missing] = admitted
        admit_pos = positions(admit_mask)
        reject_pos = positions(~admit_mask)
        lookup = self.store.lookup_for_training(keys[admit_pos], self._scores(admit_pos.numel()))
        self._check_lost(lookup.num_lost, keys.numel())
        embeddings = torch.empty((keys.numel(), self.dim), dtype=self.dtype, device=self.device)
        embeddings[admit_pos] = lookup.embeddings
        embeddings[reject_pos] = self.rejected_initializer(reject_pos.numel())
        return embeddings, LookupHandle(lookup, admit_pos)

    def apply_gradients(self, handle: LookupHandle, grads: torch.Tensor) -> None:
        """One optimizer step with ``grads [U, dim]`` (float32, summed over duplicates of each key)."""
        step = self.optimizer.next_step()
        if handle.positions is not None:
            grads = grads[handle.positions]
        self.store.update_for_training(handle.lookup, grads, self.optimizer, step)

    def _check_lost(self, num_lost: int, num_keys: int) -> None:
        mode = self.options.safe_check_mode
        if num_lost == 0 or mode is DynamicEmbCheckMode.IGNORE:
            return
        message = (
            f"dynamic table {self.name!r}: {num_lost} of {num_keys} keys of this batch could not be stored "
            f"(their buckets were full of higher scores; capacity {self.capacity}, max_capacity "
            f"{self.max_capacity}); they got zero embeddings and no update. Raise max_capacity or bucket_capacity."
        )
        if mode is DynamicEmbCheckMode.ERROR:
            raise RuntimeError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    # --- sizes, export, import ------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.store.capacity

    def size(self) -> int:
        """Keys stored (in every tier)."""
        return self.store.size()

    def load_factor(self) -> float:
        return self.store.load_factor()

    def flush(self) -> None:
        """Write cached rows back to the backing storage (``caching`` / ``external_storage`` tables)."""
        if isinstance(self.store, CachedKeyValueTable):
            self.store.flush()

    def export(
        self, min_score: int | None = None, batch_size: int = 65536
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Stored rows (``score >= min_score`` if given) as host tensors, in batches:
        ``(keys [M] int64, embeddings [M, dim], optimizer_state [M, state_dim], scores [M] int64)``."""
        for keys, values, scores in self.store.dump(min_score, batch_size):
            values = values.cpu()
            yield keys.cpu(), values[:, : self.dim], values[:, self.dim :], scores.cpu()

    def import_rows(
        self,
        keys: torch.Tensor,
        embeddings: torch.Tensor,
        optimizer_state: torch.Tensor | None,
        scores: torch.Tensor,
        *,
        cached: bool = False,
    ) -> None:
        """Store rows (unique ``keys [M]``, ``embeddings [M, dim]``, ``optimizer_state [M, state_dim]``
        or ``None`` for the initial state, ``scores [M]``), replacing rows of the same keys.
        ``cached``: the rows were in the device cache when dumped (a cached table puts them back there)."""
        n = keys.numel()
        device = self.device
        if optimizer_state is None:
            optimizer_state = self.optimizer.initial_state(n, self.dtype, device)
        values = torch.cat([embeddings.to(device, self.dtype), optimizer_state.to(device, self.dtype)], dim=1)
        keys, scores = keys.to(device), scores.to(device, torch.int64)
        if cached and isinstance(self.store, CachedKeyValueTable):
            self.store.load_cached(keys, values, scores)
        else:
            self.store.load(keys, values, scores)


def _resolve_device(device: torch.device | str | None, name: str) -> torch.device:
    resolved = torch.device("cpu" if device is None else device)
    if resolved.type == "meta":
        raise ValueError(
            f"table {name!r}: a dynamic table holds a hash table and its rows, it cannot be created on the meta device"
        )
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved
