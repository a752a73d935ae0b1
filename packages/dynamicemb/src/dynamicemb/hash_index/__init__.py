"""The hash index of dynamicemb: int64 keys -> slots, one score per slot; lookup, insertion, eviction.

``create_hash_table`` builds one; see :class:`~dynamicemb.hash_index.bucketed.BucketedHashTable` for the
score, eviction and growth rules shared by every backend, and :mod:`dynamicemb.hash_index.layout` for the
memory layout.
"""

from __future__ import annotations

import torch

from dynamicemb.hash_index.base import (
    DynamicEmbScoreStrategy,
    InsertResult,
    ScoredHashTable,
    SlotRemap,
)
from dynamicemb.hash_index.bucketed import BucketedHashTable
from dynamicemb.hash_index.torch_backend import TorchHashTable

BACKENDS = ("auto", "torch", "triton")


def create_hash_table(
    *,
    init_capacity: int,
    max_capacity: int,
    bucket_capacity: int = 128,
    max_load_factor: float = 0.5,
    score_strategy: DynamicEmbScoreStrategy = DynamicEmbScoreStrategy.TIMESTAMP,
    device: torch.device | str | None = None,
    backend: str = "auto",
    warm_up: bool = True,
    deterministic: bool | None = None,
) -> ScoredHashTable:
    """A scored hash table of at least ``init_capacity`` slots, growing up to ``max_capacity``.

    Capacities are rounded up to a power-of-two number of buckets of ``bucket_capacity`` slots
    (itself a power of two >= 4). ``backend``: ``"torch"`` (vectorized torch ops, any device),
    ``"triton"`` (GPU kernels; on CPU only under ``TRITON_INTERPRET=1``, for tests) or ``"auto"``
    (Triton on CUDA devices, torch elsewhere). ``warm_up``: a Triton table on a GPU compiles its
    kernels when created (:meth:`~dynamicemb.hash_index.triton_backend.TritonHashTable.warm_up`)
    instead of at the first call that needs each of them (the first eviction stalled ~0.9 s).
    ``deterministic``: see :class:`~dynamicemb.hash_index.bucketed.BucketedHashTable`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown hash-table backend {backend!r}; choose one of {BACKENDS}")
    resolved = torch.device("cpu" if device is None else device)
    if backend == "auto":
        backend = "triton" if resolved.type == "cuda" else "torch"
    arguments = dict(
        init_capacity=init_capacity,
        max_capacity=max_capacity,
        bucket_capacity=bucket_capacity,
        max_load_factor=max_load_factor,
        score_strategy=score_strategy,
        device=resolved,
        deterministic=deterministic,
    )
    if backend == "triton":
        from dynamicemb.hash_index.triton_backend import TritonHashTable

        return TritonHashTable(warm_up=warm_up, **arguments)
    return TorchHashTable(**arguments)


__all__ = [
    "BACKENDS",
    "BucketedHashTable",
    "DynamicEmbScoreStrategy",
    "InsertResult",
    "ScoredHashTable",
    "SlotRemap",
    "TorchHashTable",
    "create_hash_table",
]
