"""The loading pipeline: users sharded across data-parallel ranks, a `DataLoader` with worker processes,
prefetch and pinned memory, and collation into `RankingBatch` / `RetrievalBatch`."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.utils.data

import gr_parallel
from gr_models.data.collate import BatchCollator
from gr_models.data.dataset import SequenceDataset

__all__ = ["UserShardSampler", "build_dataloader", "data_parallel_position"]


def data_parallel_position() -> tuple[int, int]:
    """``(rank, size)`` of this process among the data-parallel ranks, from gr_parallel: its data-parallel group
    once the model-parallel state is initialized (tensor-parallel peers share a position), else the global rank
    and world size (0 and 1 without a process group)."""
    if gr_parallel.model_parallel_is_initialized():
        return gr_parallel.get_data_parallel_rank(), gr_parallel.get_data_parallel_world_size()
    return gr_parallel.get_rank(), gr_parallel.get_world_size()


def _check_position(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")


class UserShardSampler(torch.utils.data.Sampler[int]):
    """Indices of one data-parallel rank's users.

    Every epoch the ``num_users`` indices are shuffled by ``(seed, epoch)`` (or kept in order), and rank ``r``
    takes positions ``r, r + world_size, ...``. With ``even_shards`` (the default) the list is first padded by
    repeating its head so that every rank gets ``ceil(num_users / world_size)`` users (collectives need equal
    step counts); without it, ranks are disjoint and cover every user exactly once, with at most one user of
    difference between ranks.
    """

    def __init__(
        self,
        num_users: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        even_shards: bool = True,
    ):
        if num_users < 0:
            raise ValueError(f"num_users must be >= 0, got {num_users}")
        self.num_users = num_users
        _check_position(rank, world_size)
        self.rank, self.world_size = rank, world_size
        self.shuffle = shuffle
        self.seed = seed
        self.even_shards = even_shards
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the shuffle of the next iteration (call with the epoch number, as with DistributedSampler)."""
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        if self.shuffle:
            return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_users)
        return np.arange(self.num_users)

    def __len__(self) -> int:
        if self.even_shards:
            return -(-self.num_users // self.world_size)
        return len(range(self.rank, self.num_users, self.world_size))

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.even_shards and len(order):
            padded = len(self) * self.world_size
            order = np.resize(order, padded)
        return iter(order[self.rank :: self.world_size].tolist())


def build_dataloader(
    dataset: SequenceDataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    even_shards: bool = True,
    drop_last: bool = False,
    num_workers: int = 0,
    prefetch_factor: int | None = 2,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> torch.utils.data.DataLoader:
    """A `DataLoader` over this rank's share of ``dataset``'s users yielding collated batches.

    Args:
        dataset: any `SequenceDataset` (synthetic, MovieLens, KuaiRand, Parquet/ORC).
        batch_size: users per batch (per rank).
        shuffle, seed: per-epoch user order (call ``loader.sampler.set_epoch(epoch)`` each epoch).
        rank, world_size: data-parallel position (default: `data_parallel_position()`).
        even_shards: pad so every rank gets the same number of users (see `UserShardSampler`).
        drop_last: drop a final partial batch.
        num_workers, prefetch_factor: worker processes and batches each prefetches (ignored with 0 workers).
        pin_memory: return batches in page-locked memory (only with an accelerator build; a no-op otherwise).
        persistent_workers: keep workers alive between epochs.

    Batches are a pure function of the users they hold, so any ``num_workers`` yields the same batches in the
    same order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if rank is None or world_size is None:
        found = data_parallel_position()
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    sampler = UserShardSampler(
        len(dataset), rank=rank, world_size=world_size, shuffle=shuffle, seed=seed, even_shards=even_shards
    )
    use_workers = num_workers > 0
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=BatchCollator(dataset.schema),
        drop_last=drop_last,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if use_workers else None,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=persistent_workers and use_workers,
    )
