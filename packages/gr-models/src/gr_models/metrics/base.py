"""Shared pieces of the incremental metrics: the update/compute/reset interface and cross-rank reduction."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.distributed as dist

__all__ = ["IncrementalMetric", "all_gather_concat", "all_reduce_sum", "should_sync"]


def should_sync(sync_dist: bool, process_group: dist.ProcessGroup | None = None) -> bool:
    """True when ``sync_dist`` and a process group with more than one rank is initialized."""
    return sync_dist and dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def _collective_device(process_group: dist.ProcessGroup | None) -> torch.device:
    """Where the group's collectives take tensors: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(process_group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, process_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum of ``tensor`` over the ranks (a copy on ``tensor``'s device; the input is left unchanged)."""
    total = tensor.to(_collective_device(process_group), copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=process_group)
    return total.to(tensor.device)


def all_gather_concat(tensor: torch.Tensor, process_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenation along dim 0 of every rank's ``tensor`` (rank order, on ``tensor``'s device); dim 0 may differ
    between ranks."""
    world = dist.get_world_size(process_group)
    device = _collective_device(process_group)
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=process_group)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=process_group)
    return torch.cat([g[: int(s)] for g, s in zip(gathered, sizes)]).to(tensor.device)


class IncrementalMetric(ABC):
    """A metric accumulated over batches: ``update(...)`` per batch, ``compute()`` at any time, ``reset()``.

    With ``sync_dist`` (the default), ``compute`` combines the state of every rank of ``process_group`` when
    torch.distributed is initialized with more than one rank; every rank must then call ``compute`` together.
    """

    def __init__(self, *, sync_dist: bool = True, process_group: dist.ProcessGroup | None = None):
        self.sync_dist = sync_dist
        self.process_group = process_group
        self.reset()

    @abstractmethod
    def reset(self) -> None:
        """Forget every update."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The metric values over every update so far (all ranks' when syncing), by name."""

    def _syncing(self) -> bool:
        return should_sync(self.sync_dist, self.process_group)
