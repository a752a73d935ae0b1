"""Small collectives over a process group (the default one, or none in a single process).

``group=None`` means the default group when ``torch.distributed`` is initialized, else a world of
one process where every function is local. Background saves pass their own group (see
:mod:`gr_checkpoint.async_save`) so their collectives never interleave with the training's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from gr_checkpoint.errors import CheckpointCorruptError

__all__ = ["agree", "all_gather", "broadcast_from_zero", "rank_and_world", "split_for_rank"]

T = TypeVar("T")


def rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank in group, group size)``; ``(0, 1)`` without ``torch.distributed``."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def broadcast_from_zero(value: T, group: dist.ProcessGroup | None = None) -> T:
    """Rank 0's ``value`` on every rank."""
    if rank_and_world(group)[1] == 1:
        return value
    box = [value]
    source = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast_object_list(box, src=source, group=group)
    return box[0]


def all_gather(value: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``value``, by rank."""
    world = rank_and_world(group)[1]
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def split_for_rank(items: list[T], group: dist.ProcessGroup | None = None) -> list[T]:
    """This rank's share of ``items``: those at positions ``rank, rank + world, ...``."""
    rank, world = rank_and_world(group)
    return items[rank::world]


def _describe(failure: Exception) -> tuple[str, str, Any]:
    if isinstance(failure, CheckpointCorruptError):
        return type(failure).__name__, failure.problem, str(failure.path)
    return type(failure).__name__, str(failure), None


def agree(action: Callable[[], T], group: dist.ProcessGroup | None = None) -> list[T]:
    """Run ``action`` on every rank and gather the results; if it raised anywhere, raise on every rank:
    the failing rank its own exception, the others a :class:`CheckpointCorruptError` naming the same
    file when that is what failed, else a ``RuntimeError`` naming the rank and its error."""
    result: Any = None
    failure: Exception | None = None
    try:
        result = action()
    except Exception as error:
        failure = error
    gathered = all_gather((result, None if failure is None else _describe(failure)), group)
    if failure is not None:
        raise failure
    for other, (_, problem) in enumerate(gathered):
        if problem is not None:
            kind, message, path = problem
            if path is not None:
                raise CheckpointCorruptError(path, message)
            raise RuntimeError(f"rank {other}: {kind}: {message}")
    return [value for value, _ in gathered]
