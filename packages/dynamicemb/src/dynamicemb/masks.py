"""Positions of the entries a boolean mask selects (shared by the table and storage layers)."""

from __future__ import annotations

import torch

__all__ = ["positions", "positions_counted"]


def positions(mask: torch.Tensor) -> torch.Tensor:
    """``mask [N]`` bool -> the indices ``[M]`` int64 of its ``True`` entries, ascending, on its device."""
    return mask.nonzero().squeeze(1)


def positions_counted(mask: torch.Tensor, count: int) -> torch.Tensor:
    """:func:`positions` of a ``mask [N]`` whose number of ``True`` entries the caller already
    knows (``count``), without the device-to-host synchronization of ``nonzero``: each selected
    index is scattered to its rank (a ``cumsum``); the others go to a spare last element."""
    rank = torch.cumsum(mask, 0) - 1
    target = torch.where(mask, rank, count)
    out = torch.empty(count + 1, dtype=torch.int64, device=mask.device)
    out.scatter_(0, target, torch.arange(mask.numel(), device=mask.device))
    return out[:count]
