"""Checks of a ``KeyedJaggedTensor`` before any of its ids reach a table (no key is inserted from a bad batch)."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = ["ID_DTYPES", "checked_lengths_per_key"]

ID_DTYPES = (torch.int64, torch.int32)


def _check_dtypes(features: KeyedJaggedTensor) -> None:
    keys = features.keys()
    values, lengths = features.values(), features.lengths()
    if values.dtype not in ID_DTYPES:
        raise TypeError(f"KeyedJaggedTensor ids (values) of features {keys} must be int64 or int32; got {values.dtype}")
    if values.dim() != 1:
        raise ValueError(f"KeyedJaggedTensor values of features {keys} must be 1-D; got shape {tuple(values.shape)}")
    batch_size = features.stride()
    if lengths.numel() != len(keys) * batch_size:
        raise ValueError(
            f"KeyedJaggedTensor has {lengths.numel()} lengths; its {len(keys)} features {keys} with batch size "
            f"{batch_size} need {len(keys) * batch_size}"
        )
    weights = features.weights_or_none()
    if weights is not None and weights.shape != values.shape:
        raise ValueError(
            f"KeyedJaggedTensor weights must have one entry per id: {tuple(weights.shape)} weights for "
            f"{values.numel()} ids (features {keys})"
        )


def checked_lengths_per_key(features: KeyedJaggedTensor) -> list[int]:
    """Ids per feature of ``features`` after checking that it describes its ids consistently.

    Raises ``TypeError`` for ids that are not int32/int64 (TorchRec itself refuses non-integer
    lengths), and ``ValueError`` naming the feature for a negative length or for lengths that do not
    add up to the number of ids (the KJT would otherwise hand a table another feature's ids, or
    none). One device-to-host read.
    """
    _check_dtypes(features)
    keys = features.keys()
    batch_size = features.stride()
    if not keys or batch_size == 0:
        per_key: list[int] = [0] * len(keys)
        shortest: list[int] = [0] * len(keys)
    else:
        lengths = features.lengths().view(len(keys), batch_size).to(torch.int64)
        per_key, shortest = torch.stack([lengths.sum(dim=1), lengths.min(dim=1).values]).tolist()
    for key, low in zip(keys, shortest):
        if low < 0:
            raise ValueError(f"KeyedJaggedTensor feature {key!r} has a negative length ({low}); lengths must be >= 0")
    num_ids = features.values().numel()
    if not keys and num_ids:
        raise ValueError(f"KeyedJaggedTensor has no features but holds {num_ids} ids")
    if sum(per_key) != num_ids:
        end, culprit = 0, keys[-1] if keys else None
        for key, count in zip(keys, per_key):
            end += count
            if end > num_ids:
                culprit = key
                break
        raise ValueError(
            f"KeyedJaggedTensor lengths sum to {sum(per_key)} but it holds {num_ids} ids (values); the ids of feature "
            f"{culprit!r} do not match its lengths (ids per feature from the lengths: {dict(zip(keys, per_key))})"
        )
    return per_key
