"""The cache tier: a device key-value store used as a cache in front of a backing :class:`Storage` (a
host key-value store or an external store)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dynamicemb.hash_index.base import DynamicEmbScoreStrategy
from dynamicemb.masks import positions, positions_counted
from dynamicemb.optimizer import FusedOptimizer
from dynamicemb.storage.base import Storage
from dynamicemb.storage.key_value_store import EvictedRows, KeyValueTable, TrainingLookup, update_rows_

__all__ = ["CachedKeyValueTable"]


class CachedKeyValueTable(Storage):
    """Hot rows in ``cache`` (a device :class:`KeyValueTable` of fixed capacity), all others in ``backing``.

    A training lookup inserts its keys into the cache; rows the cache evicts are written back to
    ``backing`` with their scores; a key new to the cache takes its row from ``backing`` if there,
    else fresh initializer values (with LFU scores and a backing table, it also takes its count).
    A key the cache refuses (its bucket is full of higher scores) is served and updated in
    ``backing``. ``backing`` may keep stale copies of cached keys; the cache is authoritative until
    :meth:`flush` or an eviction writes its rows back.

    Host synchronizations of a training lookup (:meth:`lookup_for_training` then
    :meth:`update_for_training`), with a backing :class:`KeyValueTable` on the cache's device that
    cannot grow any more: the compaction of the entries the cache evicts (two, in the index), one read
    of the counts the lookup needs, and only when the cache refused keys, one for how many of them
    ``backing`` lost and one in the update for the positions of those it holds (the package README
    lists them all).
    """

    def __init__(self, cache: KeyValueTable, backing: Storage) -> None:
        if backing.value_dim != cache.value_dim or backing.dtype != cache.dtype:
            raise ValueError(
                f"backing storage rows are {backing.value_dim} x {backing.dtype}, the table needs "
                f"{cache.value_dim} x {cache.dtype} (embedding dim + optimizer state columns)"
            )
        self.cache = cache
        self.backing = backing
        self.dim = cache.dim
        self.device = cache.device
        self.version = 0

    @property
    def value_dim(self) -> int:
        return self.cache.value_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.cache.dtype

    @property
    def capacity(self) -> int:
        backing_capacity = getattr(self.backing, "capacity", None)
        return self.cache.capacity + (backing_capacity or 0)

    def load_factor(self) -> float:
        return self.size() / self.capacity

    def size(self) -> int:
        """Distinct keys stored in the cache or the backing store."""
        backing_only = sum(
            int((~self.cache.contains(keys.to(self.device))).sum()) for keys, _, _ in self.backing.dump()
        )
        return self.cache.size() + backing_only

    # --- helpers ------------------------------------------------------------------------------
    def _backing_find(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, found = self.backing.find(keys)
        return values.to(self.device, self.dtype), found.to(self.device)

    def _backing_insert(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None) -> None:
        if keys.numel():
            self.backing.insert(keys, values, scores)

    def _write_back(self, evicted: EvictedRows) -> None:
        self._backing_insert(evicted.keys, evicted.values, evicted.scores)

    def _carry_counts(
        self, keys: torch.Tensor, slots: torch.Tensor, in_backing: torch.Tensor, num_in_backing: int | None
    ) -> None:
        """LFU: keys just cached (at ``slots``) that come from a backing table add the count they had
        there, so a key moving between the tiers keeps its frequency instead of restarting at 1.
        ``num_in_backing``: how many of ``in_backing [N]`` are set, when the caller knows (``None``:
        counted here, a synchronization)."""
        if self.cache.index.score_strategy != DynamicEmbScoreStrategy.LFU:
            return
        if num_in_backing is None:
            back_pos = positions(in_backing)
        else:
            back_pos = positions_counted(in_backing, num_in_backing)
        if back_pos.numel() == 0:
            return
        try:
            backing_counts, _ = self.backing.find_scores(keys[back_pos])
        except NotImplementedError:  # a user's storage that keeps no scores: counts restart
            return
        counts = self.cache.index.scores_at(slots[back_pos]) + backing_counts.to(self.device)
        self.cache.index.insert_or_assign(keys[back_pos], counts, unique_keys=True)

    def _rows_from_backing(
        self, keys: torch.Tensor, any_absent: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ``keys [N]`` from ``backing``, fresh initializer rows where absent; and ``found [N]``.
        ``any_absent``: whether some key is absent, when the caller knows (``None``: read here, a
        synchronization). The initializer draws ``N`` rows only when some key is absent."""
        rows, found = self._backing_find(keys)
        if any_absent is None:
            any_absent = bool((~found).any())
        if any_absent:
            fresh = self.cache.new_rows(keys.numel()).to(rows.dtype)
            rows = torch.where(found.unsqueeze(1), rows, fresh)
        return rows, found

    def _backing_index_on_device(self) -> KeyValueTable | None:
        """``backing`` when its index answers on the cache's device without a host round trip."""
        backing = self.backing
        return backing if isinstance(backing, KeyValueTable) and backing.device == self.device else None

    # --- Storage ------------------------------------------------------------------------------
    def find(self, keys: torch.Tensor, columns: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        values, found = self.cache.find(keys, columns)
        miss_pos = positions(~found)
        if miss_pos.numel():
            rows, in_backing = self._backing_find(keys[miss_pos])
            values[miss_pos] = rows[:, : values.shape[1]]
            found[miss_pos] = in_backing
        return values, found

    def find_scores(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores in the cache, else in ``backing`` (``(scores [N], found [N])``)."""
        scores, found = self.cache.find_scores(keys)
        miss_pos = positions(~found)
        if miss_pos.numel():
            backing_scores, in_backing = self.backing.find_scores(keys[miss_pos])
            scores[miss_pos] = backing_scores.to(scores.device)
            found[miss_pos] = in_backing.to(found.device)
        return scores, found

    def contains(self, keys: torch.Tensor) -> torch.Tensor:
        found = self.cache.contains(keys)
        miss_pos = positions(~found)
        if miss_pos.numel():
            found[miss_pos] = self.backing.contains(keys[miss_pos]).to(self.device)
        return found

    def insert(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """Insert into the cache; its evictions and the keys it refuses go to ``backing``."""
        evicted, refused = self.cache.insert_and_evict(keys, values, scores)
        self._write_back(evicted)
        refused_pos = positions(refused)
        self._backing_insert(keys[refused_pos], values[refused_pos], None if scores is None else scores[refused_pos])
        self.version += 1

    def dump(
        self, min_score: int | None = None, batch_size: int = 65536
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Cached rows (``cache.size()`` rows when ``min_score`` is ``None``, in batches of their
        own), then the backing rows of keys not in the cache; dump files rely on this order."""
        yield from self.cache.dump(min_score, batch_size)
        for keys, values, scores in self.backing.dump(min_score, batch_size):
            keep = positions(~self.cache.contains(keys.to(self.device))).to(keys.device)
            if keep.numel():
                yield keys[keep], values[keep], scores[keep]

    def load(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> None:
        """Restore rows that lived in ``backing`` (dropping stale cached copies of the same keys).

        Rows a backing :class:`KeyValueTable` cannot hold (their bucket is full: it evicts or
        refuses them) go to the cache instead, so the table keeps every row its two tiers can
        hold together, as it did before the dump.
        """
        self.cache.erase(keys)
        if not isinstance(self.backing, KeyValueTable):
            self.backing.load(keys, values, scores)
            self.version += 1
            return
        evicted, refused = self.backing.insert_and_evict(keys, values, scores)
        refused_pos = positions(refused)
        overflow_keys = torch.cat([evicted.keys, keys[refused_pos]])
        overflow_values = torch.cat([evicted.values.to(values.dtype), values[refused_pos]])
        overflow_scores = torch.cat([evicted.scores, scores[refused_pos]])
        # An evicted backing row whose key is cached was a stale copy: the cached row is the live one.
        homeless = positions(~self.cache.contains(overflow_keys))
        if homeless.numel():
            self.insert(overflow_keys[homeless], overflow_values[homeless], overflow_scores[homeless])
        self.version += 1

    def load_cached(self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor) -> None:
        """Restore rows that lived in the cache: into the cache, with the rows it evicts or refuses
        written to ``backing`` (loaded into a fresh table of the same options, they all fit)."""
        self.insert(keys, values, scores)

    def flush(self) -> None:
        """Write every cached row back to ``backing`` (the cache keeps its rows), then flush ``backing``."""
        for keys, values, scores in self.cache.dump():
            self.backing.insert(keys, values, scores)
        self.backing.flush()

    # --- the training path ----------------------------------------------------------------------
    def lookup_for_training(self, keys: torch.Tensor, scores: torch.Tensor | None) -> TrainingLookup:
        """Unique ``keys [U]`` -> their embeddings ``[U, dim]`` (cached, or served from ``backing`` for
        the keys the cache refuses), and the :class:`TrainingLookup` for :meth:`update_for_training`.

        Host synchronizations: the compaction of the rows the cache evicts (in the index), then one
        read of every count the lookup needs (new and placed keys; with a backing table on the device,
        also whether a new key is absent from it, how many refused keys are, and how many new keys it
        holds); only when keys were refused, one more for how many of them ``backing`` lost.
        """
        result, evicted = self.cache.insert_slots(keys, scores, assign=False, read_evicted=True)
        assert evicted is not None
        self._write_back(evicted)
        slots = result.slots
        counts = _LookupCounts.read(keys, slots, result.existed, self._backing_index_on_device())
        new_pos = positions_counted(counts.new, counts.num_new)
        if counts.num_new:
            new_keys, new_slots = keys[new_pos], slots[new_pos]
            rows, in_backing = self._rows_from_backing(new_keys, counts.any_new_absent)
            self.cache.values.write(new_slots, rows)
            self._carry_counts(new_keys, new_slots, in_backing, counts.num_new_in_backing)
        num_keys = keys.numel()
        if counts.num_placed == num_keys:
            table_pos = torch.arange(num_keys, device=slots.device)
            embeddings = self.cache.values.read(slots, self.dim)
        else:
            table_pos = positions_counted(counts.placed, counts.num_placed)
            embeddings = torch.zeros((num_keys, self.dim), dtype=self.dtype, device=self.device)
            embeddings[table_pos] = self.cache.values.read(slots[table_pos], self.dim)
        elsewhere_pos = positions_counted(~counts.placed, num_keys - counts.num_placed)
        num_lost = 0
        if elsewhere_pos.numel():
            num_lost = self._serve_refused(keys, scores, elsewhere_pos, embeddings, counts)
        self.version += 1
        return TrainingLookup(
            keys=keys,
            embeddings=embeddings,
            slots=slots,
            table_pos=table_pos,
            elsewhere_pos=elsewhere_pos,
            scores=scores,
            num_lost=num_lost,
            version=self.version,
        )

    def _serve_refused(
        self,
        keys: torch.Tensor,
        scores: torch.Tensor | None,
        elsewhere_pos: torch.Tensor,
        embeddings: torch.Tensor,
        counts: _LookupCounts,
    ) -> int:
        """Serve the keys the cache refused (at ``elsewhere_pos [R]`` of ``keys [U]``) from ``backing``,
        inserting the absent ones there with fresh rows; write their embeddings into ``embeddings
        [U, dim]`` and return how many ``backing`` could not store (one synchronization)."""
        refused_keys = keys[elsewhere_pos]
        any_absent = None if counts.num_refused_absent is None else counts.num_refused_absent > 0
        rows, found = self._rows_from_backing(refused_keys, any_absent)
        if counts.num_refused_absent is None:
            absent = positions(~found)
        else:
            absent = positions_counted(~found, counts.num_refused_absent)
        refused_scores = None if scores is None else scores[elsewhere_pos]
        self._backing_insert(
            refused_keys[absent], rows[absent], None if refused_scores is None else refused_scores[absent]
        )
        embeddings[elsewhere_pos] = rows[:, : self.dim]
        return int((~self.backing.contains(refused_keys)).sum())

    def update_for_training(
        self, lookup: TrainingLookup, grads: torch.Tensor, optimizer: FusedOptimizer, step: int
    ) -> None:
        """Update cached rows in place and the others in ``backing`` (keys stored nowhere are skipped)."""
        if lookup.version == self.version:
            cache_pos, cache_slots = lookup.table_pos, lookup.slots[lookup.table_pos]
            backing_pos = lookup.elsewhere_pos
        else:
            slots, found = self.cache.index.find(lookup.keys)
            num_found = int(found.sum())  # one synchronization for both position lists
            cache_pos = positions_counted(found, num_found)
            backing_pos = positions_counted(~found, lookup.keys.numel() - num_found)
            cache_slots = slots[cache_pos]
        update_rows_(self.cache.values, cache_slots, grads[cache_pos], optimizer, step)
        if backing_pos.numel() == 0:
            return
        keys = lookup.keys[backing_pos]
        rows, found = self._backing_find(keys)
        present = positions(found)
        rows = rows[present].float()
        optimizer.update_(rows, grads[backing_pos[present]], step)
        scores = None if lookup.scores is None else lookup.scores[backing_pos[present]]
        self._backing_insert(keys[present], rows.to(self.dtype), scores)


@dataclass
class _LookupCounts:
    """The masks of a cached training lookup over its unique keys ``[U]`` and their counts, read
    from the device together (one synchronization).

    ``new [U]``: keys the cache placed that it did not hold; ``placed [U]``: keys it holds now (the
    others were refused). With a backing :class:`KeyValueTable` on the device also (else ``None``):
    whether a new key is absent from ``backing``, how many refused keys are, and how many new keys it
    holds (probed on the device after the cache's evicted rows were written back).
    """

    new: torch.Tensor
    placed: torch.Tensor
    num_new: int
    num_placed: int
    any_new_absent: bool | None = None
    num_refused_absent: int | None = None
    num_new_in_backing: int | None = None

    @staticmethod
    def read(
        keys: torch.Tensor, slots: torch.Tensor, existed: torch.Tensor, backing: KeyValueTable | None
    ) -> _LookupCounts:
        placed = slots >= 0
        new = placed & ~existed
        sums = [new.sum(), placed.sum()]
        if backing is not None:
            held = backing.contains(keys)
            sums += [(new & ~held).any().long(), (~placed & ~held).sum(), (new & held).sum()]
        read = torch.stack(sums).tolist()
        if backing is None:
            return _LookupCounts(new, placed, read[0], read[1])
        return _LookupCounts(new, placed, read[0], read[1], bool(read[2]), read[3], read[4])
