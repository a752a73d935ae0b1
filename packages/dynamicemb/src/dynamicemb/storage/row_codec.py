"""Bytes encodings of keys and rows for the key-value stores (RocksDB, Redis).

A stored key is ``prefix + 8 bytes`` (the int64 key, big-endian, sign bit flipped, so byte order
is key order); a stored value is ``8 bytes`` (the score, int64) followed by the row (``value_dim``
elements of the table's dtype), both in the machine's byte order. Both are built and parsed for a
whole batch at once with numpy, not per key in Python.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch

from dynamicemb.masks import positions

__all__ = ["RowCodec", "StorageError", "require"]

_SIGN_BIT = np.uint64(1 << 63)
SCORE_BYTES = 8


class StorageError(RuntimeError):
    """A key-value store failed (unreachable, locked, read-only, corrupt); the message names the
    store's path or address and what went wrong."""


def require(module: str, extra: str, user: str) -> ModuleType:
    """Import an optional dependency or raise an ImportError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{user} needs the {module!r} package: pip install 'dynamicemb[{extra}]'") from exc


def _rows_of_bytes(matrix: np.ndarray) -> list[bytes]:
    """``[N, W]`` uint8 -> N bytes objects of W bytes each."""
    return np.ascontiguousarray(matrix).view(f"V{matrix.shape[1]}").ravel().tolist()


class RowCodec:
    """Encodes keys ``[N]`` int64 and rows ``[N, value_dim]`` of ``dtype`` with scores ``[N]``."""

    def __init__(self, prefix: bytes, value_dim: int, dtype: torch.dtype) -> None:
        self.prefix = prefix
        self.value_dim = value_dim
        self.dtype = dtype
        self.row_bytes = value_dim * dtype.itemsize
        self.key_bytes = len(prefix) + 8

    # --- keys ---------------------------------------------------------------------------------
    def key_matrix(self, keys: torch.Tensor) -> np.ndarray:
        """``keys [N]`` -> ``[N, key_bytes]`` uint8, one stored key per row."""
        ordered = keys.detach().cpu().to(torch.int64).numpy().view(np.uint64) ^ _SIGN_BIT
        matrix = np.empty((ordered.size, self.key_bytes), dtype=np.uint8)
        matrix[:, : len(self.prefix)] = np.frombuffer(self.prefix, dtype=np.uint8)
        matrix[:, len(self.prefix) :] = ordered.astype(">u8").view(np.uint8).reshape(-1, 8)
        return matrix

    def encode_keys(self, keys: torch.Tensor) -> list[bytes]:
        return _rows_of_bytes(self.key_matrix(keys))

    def is_row_key(self, key: bytes) -> bool:
        return len(key) == self.key_bytes and key.startswith(self.prefix)

    def decode_keys(self, stored: Sequence[bytes]) -> torch.Tensor:
        if not stored:
            return torch.zeros(0, dtype=torch.int64)
        matrix = np.frombuffer(b"".join(stored), dtype=np.uint8).reshape(len(stored), self.key_bytes)
        ordered = np.ascontiguousarray(matrix[:, len(self.prefix) :]).view(">u8").ravel().astype(np.uint64)
        return torch.from_numpy((ordered ^ _SIGN_BIT).view(np.int64).copy())

    # --- rows ---------------------------------------------------------------------------------
    def encode_rows(self, values: torch.Tensor, scores: torch.Tensor) -> list[bytes]:
        return _rows_of_bytes(self.row_matrix(values, scores))

    def row_matrix(self, values: torch.Tensor, scores: torch.Tensor) -> np.ndarray:
        """``values [N, value_dim]``, ``scores [N]`` -> ``[N, 8 + row_bytes]`` uint8, one stored value per row."""
        n = values.shape[0]
        matrix = np.empty((n, SCORE_BYTES + self.row_bytes), dtype=np.uint8)
        score_bytes = scores.detach().to("cpu", torch.int64).contiguous().view(torch.uint8).reshape(n, SCORE_BYTES)
        matrix[:, :SCORE_BYTES] = score_bytes.numpy()
        row_bytes = values.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).reshape(n, self.row_bytes)
        matrix[:, SCORE_BYTES:] = row_bytes.numpy()
        return matrix

    def decode_rows(
        self, stored: Sequence[bytes | None], where: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stored values (``None``: missing) -> ``(values [N, value_dim], scores [N], found [N])``;
        missing rows read as zeros. ``where`` names the store in errors."""
        found = torch.tensor([blob is not None for blob in stored], dtype=torch.bool)
        values = torch.zeros((len(stored), self.value_dim), dtype=self.dtype)
        scores = torch.zeros(len(stored), dtype=torch.int64)
        present = [blob for blob in stored if blob is not None]
        if not present:
            return values, scores, found
        joined = b"".join(present)
        width = SCORE_BYTES + self.row_bytes
        if len(joined) != width * len(present):
            sizes = sorted({len(blob) for blob in present} - {width})
            raise StorageError(
                f"{where}: stored rows of {sizes[0]} bytes, this table's rows take {width} "
                f"(score + {self.value_dim} x {self.dtype}); was the store written by another table?"
            )
        matrix = np.frombuffer(joined, dtype=np.uint8).reshape(len(present), width)
        found_pos = positions(found)
        # Copies with standard strides, so the bytes can be viewed as int64 and as the row dtype.
        scores[found_pos] = torch.from_numpy(matrix[:, :SCORE_BYTES].copy()).view(torch.int64).squeeze(1)
        values[found_pos] = torch.from_numpy(matrix[:, SCORE_BYTES:].copy()).view(self.dtype)
        return values, scores, found
