"""MurmurHash3 (x64, 128-bit) for feature hashing: a scalar version for bytes/strings and a vectorized one for ids.

`murmur3_x64_128` follows Austin Appleby's reference `MurmurHash3_x64_128` (the function behind `mmh3.hash128`
and `mmh3.hash64`). Integer ids hash as the 8 little-endian bytes of their int64 value, computed for whole numpy
arrays at once by `hash_int64`; `hash_int64(ids)[i] == murmur3_x64_128(ids[i].tobytes())[0]`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["hash_int64", "hash_strings", "murmur3_x64_128", "to_key_space"]

_MASK64 = (1 << 64) - 1
_C1 = 0x87C37B91114253D5
_C2 = 0x4CF5AD432745937F
_FMIX_1 = 0xFF51AFD7ED558CCD
_FMIX_2 = 0xC4CEB9FE1A85EC53
_MAX_INT64 = (1 << 63) - 1


def _rotl64(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _MASK64


def _fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * _FMIX_1) & _MASK64
    k ^= k >> 33
    k = (k * _FMIX_2) & _MASK64
    return k ^ (k >> 33)


def _mix_k1(k1: int) -> int:
    return (_rotl64((k1 * _C1) & _MASK64, 31) * _C2) & _MASK64


def _mix_k2(k2: int) -> int:
    return (_rotl64((k2 * _C2) & _MASK64, 33) * _C1) & _MASK64


def murmur3_x64_128(data: bytes, seed: int = 0) -> tuple[int, int]:
    """MurmurHash3_x64_128 of ``data``: the two unsigned 64-bit halves ``(h1, h2)``."""
    length = len(data)
    h1 = h2 = seed & _MASK64
    num_blocks = length // 16
    for block in range(num_blocks):
        k1 = int.from_bytes(data[16 * block : 16 * block + 8], "little")
        k2 = int.from_bytes(data[16 * block + 8 : 16 * block + 16], "little")
        h1 ^= _mix_k1(k1)
        h1 = (_rotl64(h1, 27) + h2) & _MASK64
        h1 = (h1 * 5 + 0x52DCE729) & _MASK64
        h2 ^= _mix_k2(k2)
        h2 = (_rotl64(h2, 31) + h1) & _MASK64
        h2 = (h2 * 5 + 0x38495AB5) & _MASK64
    tail = data[16 * num_blocks :]
    if len(tail) > 8:
        h2 ^= _mix_k2(int.from_bytes(tail[8:], "little"))
    if tail:
        h1 ^= _mix_k1(int.from_bytes(tail[:8], "little"))
    h1 ^= length
    h2 ^= length
    h1 = (h1 + h2) & _MASK64
    h2 = (h2 + h1) & _MASK64
    h1 = _fmix64(h1)
    h2 = _fmix64(h2)
    h1 = (h1 + h2) & _MASK64
    h2 = (h2 + h1) & _MASK64
    return h1, h2


def _np_rotl64(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def _np_fmix64(k: np.ndarray) -> np.ndarray:
    k = k ^ (k >> np.uint64(33))
    k = k * np.uint64(_FMIX_1)
    k = k ^ (k >> np.uint64(33))
    k = k * np.uint64(_FMIX_2)
    return k ^ (k >> np.uint64(33))


def hash_int64(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """Vectorized ``murmur3_x64_128(int64 little-endian bytes, seed)[0]`` of every id: uint64, same shape."""
    keys = np.ascontiguousarray(ids, dtype="<i8").view(np.uint64)
    with np.errstate(over="ignore"):
        seed64 = np.uint64(seed & _MASK64)
        k1 = _np_rotl64(keys * np.uint64(_C1), 31) * np.uint64(_C2)
        h1 = (seed64 ^ k1) ^ np.uint64(8)
        h2 = np.full_like(h1, seed64 ^ np.uint64(8))
        h1 = h1 + h2
        h2 = h2 + h1
        h1 = _np_fmix64(h1)
        h2 = _np_fmix64(h2)
        return h1 + h2


def hash_strings(values: Iterable[str | bytes], seed: int = 0) -> np.ndarray:
    """``murmur3_x64_128(utf-8 bytes, seed)[0]`` of every string: uint64 ``[len(values)]`` (a Python loop)."""
    out = [murmur3_x64_128(v.encode() if isinstance(v, str) else bytes(v), seed)[0] for v in values]
    return np.array(out, dtype=np.uint64)


def to_key_space(hashes: np.ndarray, num_buckets: int) -> np.ndarray:
    """Map uint64 hashes to int64 ids: ``hash % num_buckets`` for a static table of ``num_buckets`` rows, or
    the hash with its top bit cleared (a non-negative int64 key) when ``num_buckets == 0`` (dynamic tables)."""
    if num_buckets < 0:
        raise ValueError(f"num_buckets must be >= 0, got {num_buckets}")
    if num_buckets == 0:
        return (hashes & np.uint64(_MAX_INT64)).astype(np.int64)
    return (hashes % np.uint64(num_buckets)).astype(np.int64)
