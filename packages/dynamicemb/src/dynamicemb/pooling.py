"""Pooling of bags of embeddings (SUM / MEAN), shared by the standalone and the sharded bag collections."""

from __future__ import annotations

import torch
from torchrec.modules.embedding_configs import PoolingType

from dynamicemb.deterministic import is_deterministic, pool_sorted_segments

__all__ = ["pool_bags"]


def pool_bags(
    embeddings: torch.Tensor,
    lengths: torch.Tensor,
    weights: torch.Tensor | None,
    pooling: PoolingType,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """``embeddings [N, D]`` of ``len(lengths)`` bags (``lengths [B]``, summing to ``N``) ->
    ``[B, D]`` float32: weighted (``weights [N]``) SUM, or MEAN over each bag (empty bags: zeros).
    ``deterministic`` (``None``: torch's global setting): one sequential sum per bag instead of
    ``index_add`` (atomic adds on CUDA)."""
    values = embeddings.float()
    if weights is not None:
        values = values * weights.unsqueeze(1).float()
    if is_deterministic(deterministic):
        pooled = pool_sorted_segments(values, lengths)
    else:
        bags = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=values.device), lengths, output_size=values.shape[0]
        )
        pooled = torch.zeros((lengths.numel(), values.shape[1]), dtype=torch.float32, device=values.device)
        pooled = pooled.index_add(0, bags, values)
    if pooling == PoolingType.MEAN:
        pooled = pooled / lengths.clamp(min=1).unsqueeze(1)
    return pooled
