"""Memory layout shared by every backend: buckets of slots, one state/digest byte per slot.

A table of ``num_buckets * bucket_capacity`` slots keeps four arrays indexed by slot:

- ``keys   [capacity] int64``  the key held by an occupied slot (meaningless otherwise);
- ``scores [capacity] int64``  its score;
- ``digests[capacity] uint8``  the slot's state: ``EMPTY`` (never used), ``TOMBSTONE`` (erased),
  ``BUSY`` (being written by a GPU insertion, never visible between calls) or, for an occupied
  slot, the key's 1-byte digest in ``[FIRST_DIGEST, 255]``;
- ``epochs [capacity] int32``  the insertion call that last touched the slot, so that a call never
  evicts an entry it has itself found or inserted (the Triton kernels mark a slot they insert into
  with the negated epoch, which tells a duplicate key later in the same call that it is new; a call
  with epoch ``e`` treats ``e`` and ``-e`` as touched).

Occupancy lives in the digest byte, never in the key, so every int64 value is a valid key.

A key's 64-bit hash ``h`` (murmur3's finalizer) picks its bucket from the low bits
(``h & (num_buckets - 1)``), the group of ``group_size`` slots where its probe starts from bits 32
and up, and its digest from the top byte. Inside a bucket a key is placed at the first free slot
(``EMPTY`` or ``TOMBSTONE``) in probe order: groups ``start, start + 1, ...`` wrapping around the
bucket. A probe stops at the first ``EMPTY`` slot, so a lookup at load factor 0.5 usually reads a
single group of 16 digests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMPTY = 0
TOMBSTONE = 1
BUSY = 2
FIRST_DIGEST = 3

MAX_GROUP_SIZE = 16
MIN_BUCKET_CAPACITY = 4

_MIX1 = -49064778989728563  # 0xff51afd7ed558ccd as int64
_MIX2 = -4265267296055464877  # 0xc4ceb9fe1a85ec53 as int64


def _shift_right_logical(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def hash_keys(keys: torch.Tensor) -> torch.Tensor:
    """murmur3 ``fmix64`` of int64 keys ``[N]`` -> ``[N]`` int64 (the uint64 hash's bit pattern)."""
    h = keys ^ _shift_right_logical(keys, 33)
    h = h * _MIX1
    h = h ^ _shift_right_logical(h, 33)
    h = h * _MIX2
    return h ^ _shift_right_logical(h, 33)


def digest_of_hash(h: torch.Tensor) -> torch.Tensor:
    """Top byte of the hash moved out of the reserved states: ``[N]`` uint8 in ``[FIRST_DIGEST, 255]``."""
    top = _shift_right_logical(h, 56)
    return torch.where(top < FIRST_DIGEST, top + FIRST_DIGEST, top).to(torch.uint8)


def bucket_of(keys: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """The bucket ``[N]`` int64 of each key in a table of ``num_buckets`` (a power of two) buckets."""
    return hash_keys(keys) & (num_buckets - 1)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def num_buckets_for(capacity: int, bucket_capacity: int) -> int:
    """Smallest power-of-two number of buckets holding at least ``capacity`` slots."""
    return next_power_of_two(max(1, -(-capacity // bucket_capacity)))


def check_bucket_capacity(bucket_capacity: int) -> None:
    if bucket_capacity < MIN_BUCKET_CAPACITY or bucket_capacity & (bucket_capacity - 1):
        raise ValueError(f"bucket_capacity must be a power of two >= {MIN_BUCKET_CAPACITY}, got {bucket_capacity}")


@dataclass
class TableStorage:
    """The arrays of one table (see the module docstring); ``size`` is a ``[1]`` int64 counter."""

    num_buckets: int
    bucket_capacity: int
    keys: torch.Tensor
    scores: torch.Tensor
    digests: torch.Tensor
    epochs: torch.Tensor
    size: torch.Tensor

    @classmethod
    def allocate(cls, num_buckets: int, bucket_capacity: int, device: torch.device) -> TableStorage:
        capacity = num_buckets * bucket_capacity
        return cls(
            num_buckets=num_buckets,
            bucket_capacity=bucket_capacity,
            keys=torch.zeros(capacity, dtype=torch.int64, device=device),
            scores=torch.zeros(capacity, dtype=torch.int64, device=device),
            digests=torch.full((capacity,), EMPTY, dtype=torch.uint8, device=device),
            epochs=torch.zeros(capacity, dtype=torch.int32, device=device),
            size=torch.zeros(1, dtype=torch.int64, device=device),
        )

    @property
    def capacity(self) -> int:
        return self.num_buckets * self.bucket_capacity

    @property
    def group_size(self) -> int:
        return min(MAX_GROUP_SIZE, self.bucket_capacity)

    @property
    def num_groups(self) -> int:
        return self.bucket_capacity // self.group_size

    def bucket_and_group(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hashes ``[N]`` -> (bucket index ``[N]``, first probed group ``[N]``), both int64."""
        bucket = h & (self.num_buckets - 1)
        group = _shift_right_logical(h, 32) & (self.num_groups - 1)
        return bucket, group
