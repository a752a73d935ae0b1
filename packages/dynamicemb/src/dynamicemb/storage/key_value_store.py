"""The key-value store tier: a scored hash index (:mod:`dynamicemb.hash_index`, keys -> slots) over a
value store (:mod:`dynamicemb.storage.value_store`, one row per slot) in device or device + host memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from dynamicemb.hash_index import create_hash_table
from dynamicemb.hash_index.base import DynamicEmbScoreStrategy, InsertResult
from dynamicemb.masks import positions, positions_counted
from dynamicemb.optimizer import FusedOptimizer
from dynamicemb.storage.base import Storage
from dynamicemb.storage.value_store import DeviceValueStore, ValueStore, create_value_store, resize_value_store

__all__ = ["EvictedRows", "KeyValueTable", "TrainingLookup", "update_rows_"]

NewRows = Callable[[int], torch.Tensor]


@dataclass(frozen=True)
class EvictedRows:
    """Rows pushed out of a table by an insertion: ``keys [E]``, ``values [E, value_dim]``, ``scores [E]``."""

    keys: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor


@dataclass
class TrainingLookup:
    """What a training lookup of unique ``keys [U]`` found, kept for the backward update.

    embeddings:  ``[U, dim]``.
    slots:       ``[U]`` slots in the (device) table, ``-1`` where the table did not take the key.
    table_pos:   positions (into ``keys``) of keys with a slot.
    elsewhere_pos: positions of keys the table refused but that a backing store holds (caching).
    scores:      the scores the lookup passed (CUSTOMIZED), else ``None``.
    num_lost:    keys stored nowhere (their embedding is zero and they get no update).
    version:     the table's version right after the lookup; slots are reused in backward only if
                 no insertion, eviction or growth happened since.
    """

    keys: torch.Tensor
    embeddings: torch.Tensor
    slots: torch.Tensor
    table_pos: torch.Tensor
    elsewhere_pos: torch.Tensor
    scores: torch.Tensor | None
    num_lost: int
    version: int


def update_rows_(
    values: ValueStore, slots: torch.Tensor, grads: torch.Tensor, optimizer: FusedOptimizer, step: int
) -> None:
    """Apply the optimizer to the rows at distinct ``slots [M]`` with summed ``grads [M, dim]``:
    in place by one Triton kernel for device rows on CUDA, else read / update / write."""
    if slots.numel() == 0:
        return
    if isinstance(values, DeviceValueStore) and values.device.type == "cuda":
        from dynamicemb.triton_optimizer import fused_update_triton_

        fused_update_triton_(values.rows, slots, grads.contiguous(), optimizer, step)
        return
    rows = values.read(slots).float()
    optimizer.update_(rows, grads, step)
    values.write(slots, rows)


class KeyValueTable(Storage):
    """Keys -> value rows ``[embedding (dim) | optimizer state]``, growing and evicting by score.

    The index lives on ``device``; value rows are split between device memory and host memory by
    ``device_budget_bytes`` (``None``: all on ``device``). When the index grows it returns a
    :class:`~dynamicemb.hash_index.base.SlotRemap` and the rows move with their keys. New keys get
    ``new_rows(n)`` (``[n, value_dim]``). ``hash_backend`` picks the index implementation
    (:func:`~dynamicemb.hash_index.create_hash_table`: ``"auto"``, ``"torch"`` or ``"triton"``);
    ``warm_up_kernels``: a Triton index on a GPU compiles its kernels when created;
    ``deterministic``: the index's placement mode (:mod:`dynamicemb.deterministic`).
    """

    def __init__(
        self,
        *,
        dim: int,
        value_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        init_capacity: int,
        max_capacity: int,
        bucket_capacity: int,
        max_load_factor: float,
        score_strategy: DynamicEmbScoreStrategy,
        device_budget_bytes: int | None,
        new_rows: NewRows,
        hash_backend: str = "auto",
        warm_up_kernels: bool = True,
        deterministic: bool | None = None,
    ) -> None:
        self.dim = dim
        self._value_dim = value_dim
        self._dtype = dtype
        self.device = device
        self.device_budget_bytes = device_budget_bytes
        self.new_rows = new_rows
        self.index = create_hash_table(
            init_capacity=init_capacity,
            max_capacity=max_capacity,
            bucket_capacity=bucket_capacity,
            max_load_factor=max_load_factor,
            score_strategy=score_strategy,
            device=device,
            backend=hash_backend,
            warm_up=warm_up_kernels,
            deterministic=deterministic,
        )
        self.values = create_value_store(self.index.capacity, value_dim, dtype, device, device_budget_bytes)
        self.version = 0

    # --- sizes -------------------------------------------------------------------------------
    @property
    def value_dim(self) -> int:
        return self._value_dim

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def capacity(self) -> int:
        return self.index.capacity

    def size(self) -> int:
        return self.index.size()

    def load_factor(self) -> float:
        return self.index.load_factor()

    # --- index operations with their value rows ------------------------------------------------
    def _grow_for(self, keys: torch.Tensor) -> None:
        """Double the index (moving value rows) if inserting the missing ``keys`` would pass the
        load factor. Costs a find and a device-to-host read while the table can still grow."""
        if self.index.capacity >= self.index.max_capacity:
            return
        _, found = self.index.find(keys)
        remap = self.index.reserve(int((~found).sum()))
        if remap is not None:
            self.values = resize_value_store(self.values, remap, self.device_budget_bytes)
            self.version += 1

    def insert_slots(
        self, keys: torch.Tensor, scores: torch.Tensor | None, *, assign: bool, read_evicted: bool
    ) -> tuple[InsertResult, EvictedRows | None]:
        """Give unique ``keys`` slots (growing first); the rows of the new keys are not yet written.
        The keys must be distinct: the index is told so (``unique_keys=True``) and skips deduplicating."""
        self._grow_for(keys)
        if assign:
            result = self.index.insert_and_evict(keys, scores, unique_keys=True)
        else:
            result = self.index.find_or_insert(keys, scores, unique_keys=True)
        self.version += 1
        evicted = None
        if read_evicted:
            evicted = EvictedRows(result.evicted_keys, self.values.read(result.evicted_slots), result.evicted_scores)
        return result, evicted

    def find(self, keys: torch.Tensor, columns: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys [N]`` -> ``(values [N, columns or value_dim], found [N])``; missing keys read as zeros.
        Scores are not touched."""
        slots, found = self.index.find(keys)
        rows = self.values.read(slots.clamp(min=0), columns)
        return torch.where(found.unsqueeze(1), rows, torch.zeros((), dtype=rows.dtype, device=rows.device)), found

    def contains(self, keys: torch.Tensor) -> torch.Tensor:
        return self.index.find(keys)[1]

    def find_scores(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys [N]`` -> ``(scores [N] int64, found [N])``; missing keys read as 0. Scores are not touched."""
        slots, found = self.index.find(keys)
        scores = self.index.scores_at(slots.clamp(min=0))
        return torch.where(found, scores, torch.zeros_like(scores)), found

    def find_or_insert(self, keys: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """Unique ``keys [N]`` -> ``values [N, value_dim]``; keys not present are inserted with
        ``new_rows``. A key the table refuses gets fresh ``new_rows`` values that are not stored."""
        result, _ = self.insert_slots(keys, scores, assign=False, read_evicted=False)
        slots = result.slots
        new_pos = positions(~result.existed & (slots >= 0))
        self.values.write(slots[new_pos], self.new_rows(new_pos.numel()))
        values = self.values.read(slots.clamp(min=0))
        refused_pos = positions(slots < 0)
        if refused_pos.numel():
            values[refused_pos] = self.new_rows(refused_pos.numel()).to(values.dtype)
        return values

    def insert_and_evict(
        self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None = None
    ) -> tuple[EvictedRows, torch.Tensor]:
        """Insert or overwrite unique ``keys [N]`` with ``values [N, value_dim]``.

        Returns the rows evicted to make room (keys, values, scores) and ``refused [N]`` bool for
        keys the table did not take.
        """
        result, evicted = self.insert_slots(keys, scores, assign=True, read_evicted=True)
        assert evicted is not None
        self.values.write_placed(result.slots, values)
        return evicted, result.refused

    def insert(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """Insert or overwrite unique ``keys [N]`` with ``values [N, value_dim]``; rows evicted to make
        room are dropped unread (no compaction of the evicted entries, so no host synchronization for
        them: a cache writing its evicted rows back here waits for none)."""
        result, _ = self.insert_slots(keys, scores, assign=True, read_evicted=False)
        self.values.write_placed(result.slots, values)

    def erase(self, keys: torch.Tensor) -> torch.Tensor:
        """Remove keys; ``[N]`` bool, True where a key was present."""
        self.version += 1
        return self.index.erase(keys)

    def dump(
        self, min_score: int | None = None, batch_size: int = 65536
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start in range(0, self.index.capacity, batch_size):
            if min_score is None:
                keys, slots, scores = self.index.export_batch(start, batch_size)
            else:
                keys, slots, scores = self.index.export_batch_if(start, batch_size, min_score)
            if keys.numel():
                yield keys, self.values.read(slots), scores

    def load(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> None:
        self.insert_and_evict(keys, values, scores)

    # --- the training path ----------------------------------------------------------------------
    def lookup_for_training(self, keys: torch.Tensor, scores: torch.Tensor | None) -> TrainingLookup:
        """Find or insert unique ``keys [U]`` and return their embeddings; refused keys read as zeros."""
        result, _ = self.insert_slots(keys, scores, assign=False, read_evicted=False)
        slots = result.slots
        placed = slots >= 0
        new = placed & ~result.existed
        # One synchronization for both counts (the initializer needs the number of new rows).
        num_new, num_placed = torch.stack([new.sum(), placed.sum()]).tolist()
        if num_new:
            self.values.write(slots[positions_counted(new, num_new)], self.new_rows(num_new))
        if num_placed == keys.numel():
            table_pos = torch.arange(num_placed, device=slots.device)
            embeddings = self.values.read(slots, self.dim)
        else:
            table_pos = positions_counted(placed, num_placed)
            embeddings = torch.zeros((keys.numel(), self.dim), dtype=self._dtype, device=self.device)
            embeddings[table_pos] = self.values.read(slots[table_pos], self.dim)
        empty = table_pos[:0]
        return TrainingLookup(
            keys=keys,
            embeddings=embeddings,
            slots=slots,
            table_pos=table_pos,
            elsewhere_pos=empty,
            scores=scores,
            num_lost=keys.numel() - table_pos.numel(),
            version=self.version,
        )

    def current_slots(self, lookup: TrainingLookup) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(positions, slots)`` of the lookup's keys that are in the table now (``positions``
        ``None``: all of them, in order): the slots the lookup found when nothing moved since, else
        a fresh find."""
        if lookup.version == self.version:
            if lookup.table_pos.numel() == lookup.keys.numel():
                return None, lookup.slots
            return lookup.table_pos, lookup.slots[lookup.table_pos]
        slots, found = self.index.find(lookup.keys)
        found_pos = positions(found)
        return found_pos, slots[found_pos]

    def update_for_training(
        self, lookup: TrainingLookup, grads: torch.Tensor, optimizer: FusedOptimizer, step: int
    ) -> None:
        """Apply ``grads [U, dim]`` (summed per unique key) to the rows of the lookup's keys still
        in the table; keys evicted since the lookup get no update."""
        positions, slots = self.current_slots(lookup)
        update_rows_(self.values, slots, grads if positions is None else grads[positions], optimizer, step)
