"""MurmurHash3 x64_128 against published test vectors, and the vectorized int64 path against the scalar one."""

from __future__ import annotations

import numpy as np
import pytest

from gr_models.data.hashing import hash_int64, hash_strings, murmur3_x64_128, to_key_space


def _digest_hex(data: bytes, seed: int = 0) -> str:
    """The 16-byte digest as printed by the reference implementation (h1 then h2, little-endian)."""
    h1, h2 = murmur3_x64_128(data, seed)
    return (h1.to_bytes(8, "little") + h2.to_bytes(8, "little")).hex()


@pytest.mark.parametrize(
    ("data", "seed", "expected_hex"),
    [
        (b"", 0, "00" * 16),
        (b"The quick brown fox jumps over the lazy dog", 0, "6c1b07bc7bbc4be347939ac4a93c437a"),
        (b"The quick brown fox jumps over the lazy dog.", 0, "c902e99e1f4899cde7b68789a3a15d69"),
    ],
)
def test_murmur3_x64_128_published_digests(data, seed, expected_hex):
    assert _digest_hex(data, seed) == expected_hex


def test_murmur3_x64_128_matches_mmh3_documented_values():
    # mmh3.hash64("foo") == (-2129773440516405919, 9128664383759220103); mmh3.hash128("foo", 42) below.
    h1, h2 = murmur3_x64_128(b"foo")
    assert (h1 - (1 << 64), h2) == (-2129773440516405919, 9128664383759220103)
    h1, h2 = murmur3_x64_128(b"foo", 42)
    assert (h2 << 64) | h1 == 215966891540331383248189432718888555506


def test_vectorized_int64_hash_equals_scalar_hash_of_the_bytes():
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.integers(-(1 << 62), 1 << 62, 200), [0, 1, -1, np.iinfo(np.int64).max]])
    for seed in (0, 7, 2**40 + 3):
        expected = [murmur3_x64_128(int(i).to_bytes(8, "little", signed=True), seed)[0] for i in ids]
        assert hash_int64(ids, seed).tolist() == expected


def test_string_hash_and_key_spaces():
    hashes = hash_strings(["foo", b"The quick brown fox jumps over the lazy dog"])
    assert hashes.dtype == np.uint64
    assert int(hashes[0]) == murmur3_x64_128(b"foo")[0]
    buckets = to_key_space(hashes, 1000)
    assert buckets.dtype == np.int64 and ((buckets >= 0) & (buckets < 1000)).all()
    assert buckets.tolist() == [int(h) % 1000 for h in hashes]
    keys = to_key_space(hashes, 0)
    assert (keys >= 0).all() and keys.tolist() == [int(h) & ((1 << 63) - 1) for h in hashes]
    with pytest.raises(ValueError, match="num_buckets"):
        to_key_space(hashes, -1)


def test_hash_spreads_sequential_ids_evenly():
    buckets = to_key_space(hash_int64(np.arange(100_000)), 16)
    counts = np.bincount(buckets, minlength=16)
    assert counts.min() > 0.9 * 100_000 / 16 and counts.max() < 1.1 * 100_000 / 16
