"""Checks that every rank was configured alike, with one small all-gather of a hash."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["check_same_across_ranks", "stable_hash"]


def _portable(value: Any) -> Any:
    """A JSON-encodable stand-in for ``value``: dataclasses by field, enums by name, other objects
    by ``repr`` unless it holds a memory address (then by type name, e.g. a user's storage object)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    text = repr(value)
    return type(value).__qualname__ if " at 0x" in text else text


def stable_hash(obj: Any) -> int:
    """A 63-bit hash of ``obj`` that is the same in every process (unlike ``hash()``).

    ``obj`` is serialized as sorted-key JSON; dataclasses are written field by field, enums by
    name, other values JSON cannot encode by ``repr`` (by type name where the ``repr`` holds a
    memory address, which differs between processes).
    """
    text = json.dumps(obj, sort_keys=True, default=_portable)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def check_same_across_ranks(obj: Any, name: str, group: dist.ProcessGroup | None = None) -> None:
    """Raise ``RuntimeError`` on every rank of ``group`` unless ``obj`` hashes alike on all of them.

    One all-gather of one int64 per rank (:func:`stable_hash`). Collective: every rank of
    ``group`` (default: the world) must call it. A no-op without a process group or in a
    one-rank group. The error names ``name`` and which ranks differ from rank 0.
    """
    if not dist.is_available() or not dist.is_initialized():
        return
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    local = torch.tensor([stable_hash(obj)], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local, group=group)
    hashes = [int(t.item()) for t in gathered]
    differing = [rank for rank, value in enumerate(hashes) if value != hashes[0]]
    if differing:
        raise RuntimeError(
            f"{name} differs across ranks: ranks {differing} do not match rank 0 "
            f"(this rank, {dist.get_rank(group)}, has {obj!r:.300})"
        )
