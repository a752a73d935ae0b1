"""Positions of the entries a boolean mask selects (shared by the table and storage layers)."""

from __future__ import annotations

import torch

__all__ = ["positions"]


def positions(mask: torch.Tensor) -> torch.Tensor:
    """``mask [N]`` bool -> the indices ``[M]`` int64 of its ``True`` entries, ascending, on its device."""
    return mask.nonzero().squeeze(1)
