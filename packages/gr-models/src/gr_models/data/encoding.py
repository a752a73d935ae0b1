"""Turning raw per-user attributes into embedding ids."""

from __future__ import annotations

import numpy as np

__all__ = ["categorical_ids", "lookup_by_key"]


def categorical_ids(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Ids ``1..V`` for the sorted distinct values; returns ``(ids, V + 1)`` so that 0 can mean "unknown"."""
    distinct, inverse = np.unique(values, return_inverse=True)
    return inverse.astype(np.int64) + 1, len(distinct) + 1


def lookup_by_key(keys: np.ndarray, table_keys: np.ndarray, table_values: np.ndarray, missing: int = 0) -> np.ndarray:
    """``table_values`` of each key (``missing`` where a key is absent from ``table_keys``)."""
    if len(table_keys) == 0:
        return np.full(len(keys), missing, dtype=np.int64)
    order = np.argsort(table_keys, kind="stable")
    sorted_keys = table_keys[order]
    position = np.clip(np.searchsorted(sorted_keys, keys), 0, len(sorted_keys) - 1)
    return np.where(sorted_keys[position] == keys, table_values[order][position], missing).astype(np.int64)
