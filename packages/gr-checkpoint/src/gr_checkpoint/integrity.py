"""Checksums of every file of a checkpoint: recorded in the manifest at save, verified before a load.

Each file is recorded as ``{"size": bytes, "crc32": zlib CRC32 of its bytes}`` under its path
relative to the checkpoint folder (``/``-separated; the manifest itself is not listed, it carries
its own checksum, see :mod:`gr_checkpoint.manifest`). CRC32 is streamed in blocks of 16 MiB
(about 4 GB/s on one core, so a file costs about one extra read). It detects accidental damage
(bit flips, truncation, a file from another save), not deliberate tampering: whoever can rewrite
a file can rewrite the manifest too.

With several ranks the work is split: rank ``r`` of ``W`` checksums (at save) or verifies (at load)
the files ``r, r + W, ...`` of the sorted list, and the results are gathered (every rank sees the
same folder, as DCP and dynamicemb already require).
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch.distributed as dist

from gr_checkpoint.collective import agree, broadcast_from_zero, rank_and_world, split_for_rank
from gr_checkpoint.errors import CheckpointCorruptError
from gr_checkpoint.manifest import MANIFEST_NAME, FileRecord

__all__ = [
    "file_record",
    "list_checkpoint_files",
    "record_checkpoint_files",
    "record_files",
    "verify_checkpoint_files",
    "verify_file",
    "verify_files",
    "writer_hint",
]

_BLOCK = 1 << 24
_DCP_FILE = re.compile(r"__(\d+)_\d+\.distcp")
_DYNAMIC_SHARD = re.compile(r".*\.shard-(\d+)-of-(\d+)\.dynamicemb")


def file_record(path: Path) -> FileRecord:
    """Size and CRC32 of the file at ``path``, read in blocks."""
    crc, size = 0, 0
    with open(path, "rb") as file:
        while block := file.read(_BLOCK):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return FileRecord(size=size, crc32=crc)


def list_checkpoint_files(directory: Path) -> list[str]:
    """Every regular file under ``directory`` but the manifest, as sorted ``/``-separated relative paths."""
    names = []
    for folder, _, files in os.walk(directory):
        for name in files:
            path = Path(folder) / name
            relative = path.relative_to(directory).as_posix()
            if relative != MANIFEST_NAME and path.is_file():
                names.append(relative)
    return sorted(names)


def record_files(directory: Path, names: Iterable[str]) -> dict[str, FileRecord]:
    """``{name: record}`` of the files ``directory/name``."""
    return {name: file_record(directory / name) for name in names}


def writer_hint(name: str) -> str:
    """`` (written by rank r)`` when the file name says which rank wrote it (DCP data, dynamic-table shards)."""
    base = name.rsplit("/", 1)[-1]
    match = _DCP_FILE.fullmatch(base) or _DYNAMIC_SHARD.fullmatch(base)
    return f" (written by rank {match.group(1)})" if match else ""


def verify_file(directory: Path, name: str, record: FileRecord) -> None:
    """Raise :class:`CheckpointCorruptError` naming ``directory/name`` unless it has ``record``'s size and CRC32."""
    path = directory / name
    if not path.is_file():
        raise CheckpointCorruptError(path, f"missing; the manifest lists it ({record.size} bytes){writer_hint(name)}")
    size = path.stat().st_size
    if size != record.size:
        shape = "truncated" if size < record.size else "too long"
        raise CheckpointCorruptError(path, f"{shape}: {size} bytes, the manifest says {record.size}{writer_hint(name)}")
    actual = file_record(path)
    if actual != record:
        raise CheckpointCorruptError(
            path, f"corrupt: CRC32 {actual.crc32:#010x}, the manifest says {record.crc32:#010x}{writer_hint(name)}"
        )


def verify_files(directory: Path, records: Mapping[str, FileRecord], names: Iterable[str]) -> None:
    """:func:`verify_file` for each of ``names``."""
    for name in names:
        verify_file(directory, name, records[name])


def record_checkpoint_files(directory: Path, group: dist.ProcessGroup | None = None) -> dict[str, FileRecord]:
    """Collective: the records of every file under ``directory`` (rank 0 lists them, each rank checksums its share)."""
    listing: list[str] | str
    if rank_and_world(group)[0] == 0:
        try:
            listing = list_checkpoint_files(directory)
        except OSError as error:
            listing = f"listing {directory}: {error}"
    else:
        listing = []
    listing = broadcast_from_zero(listing, group)
    if isinstance(listing, str):
        raise OSError(listing)
    names = listing
    shares = agree(lambda: record_files(directory, split_for_rank(names, group)), group)
    return {name: record for share in shares for name, record in share.items()}


def verify_checkpoint_files(
    directory: Path, records: Mapping[str, FileRecord], group: dist.ProcessGroup | None = None
) -> None:
    """Collective: raise :class:`CheckpointCorruptError` on every rank naming a file of ``records`` that is
    missing, of another size or another CRC32 (each rank verifies its share)."""
    names = sorted(records)
    agree(lambda: verify_files(directory, records, split_for_rank(names, group)), group)
