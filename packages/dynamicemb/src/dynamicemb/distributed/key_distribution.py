"""Which rank owns a key: the rules of :class:`~dynamicemb.planner.KeyDistribution` in torch ops."""

from __future__ import annotations

import torch

from dynamicemb.distributed.parameter_sharding import KeyDistribution
from dynamicemb.hash_index.layout import hash_keys

__all__ = ["owner_ranks"]

_SALT = 0x9E3779B97F4A7C15 - (1 << 64)  # the golden-ratio constant as an int64
_LOW_63_BITS = (1 << 63) - 1


def owner_ranks(keys: torch.Tensor, world_size: int, distribution: KeyDistribution) -> torch.Tensor:
    """``keys [N]`` int64 -> owning rank ``[N]`` int64 in ``[0, world_size)``, on the keys' device."""
    if world_size == 1:
        return torch.zeros_like(keys)
    if distribution is KeyDistribution.MODULO:
        return torch.remainder(keys, world_size)
    if distribution is KeyDistribution.HASH:
        return (hash_keys(keys ^ _SALT) & _LOW_63_BITS) % world_size
    raise NotImplementedError(f"key distribution {distribution}")
