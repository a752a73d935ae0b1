"""Dynamic tables copied to host memory now and written later, in dynamicemb's dump formats.

The files are those a synchronous save writes through dynamicemb (same names, same format, read
back by the same ``DynamicEmbLoad`` / ``load_sharded``):

- standalone modules: ``dynamicemb_module/<module>/<table>.dynamicemb``;
- sharded modules: per table and rank ``r`` of the module's group of ``W``,
  ``dynamicemb_module/<module>/<table>.<dump id>.shard-<r>-of-<W>.dynamicemb``, and per module
  ``sharded_manifest.json`` naming them (the layout documented in
  :mod:`dynamicemb.distributed.checkpoint`), written by rank 0 once every rank's files are written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from torch import nn

from dynamicemb.distributed import find_sharded_modules
from dynamicemb.distributed.checkpoint import MANIFEST_NAME as SHARDED_MANIFEST_NAME
from dynamicemb.dump import find_dynamic_modules, fsync_folder, table_file_path
from dynamicemb.dump.file_format import TableSnapshot
from dynamicemb.dump.standalone import write_temporary_table_file

__all__ = ["TableFileSnapshot", "snapshot_tables", "write_sharded_manifests", "write_table_snapshots"]

_SHARDED_FORMAT = {"format": "dynamicemb-sharded-dump", "version": 1}


@dataclass(frozen=True)
class TableFileSnapshot:
    """One table file to write: its path relative to ``dynamicemb_module/`` and the rows. For a
    shard of a sharded module also the manifest entry of its table (``None`` for standalone)."""

    relative_path: str
    snapshot: TableSnapshot
    module: str
    table: str
    sharded_entry: dict | None = None


def _shard_name(table: str, dump_id: str, rank: int, world_size: int) -> str:
    return f"{table}.{dump_id}.shard-{rank}-of-{world_size}.dynamicemb"


def snapshot_tables(model: nn.Module, dump_id: str) -> list[TableFileSnapshot]:
    """Host copies of every dynamic table of ``model`` (this rank's shards of the sharded ones)."""
    files = [
        TableFileSnapshot(
            os.path.relpath(table_file_path("", module_name, name)), TableSnapshot.take(table), module_name, name
        )
        for module_name, module in find_dynamic_modules(model).items()
        for name, table in module.dynamic_embedding_tables().items()
    ]
    for module_name, module in find_sharded_modules(model).items():
        rank, world_size = dist.get_rank(module.process_group), dist.get_world_size(module.process_group)
        distributions = module.key_distributions()
        for name, table in module.dynamic_embedding_tables().items():
            entry = {
                "dump_id": dump_id,
                "world_size": world_size,
                "key_distribution": distributions[name].value,
                "optim": True,
                "files": [_shard_name(name, dump_id, r, world_size) for r in range(world_size)],
            }
            relative = f"{module_name}/{_shard_name(name, dump_id, rank, world_size)}"
            files.append(TableFileSnapshot(relative, TableSnapshot.take(table), module_name, name, entry))
    return files


def write_table_snapshots(folder: Path, files: list[TableFileSnapshot]) -> None:
    """Write each snapshot (with optimizer state) to ``folder/<relative path>``, flushed to disk."""
    for file in files:
        final = folder / file.relative_path
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(write_temporary_table_file(str(final), file.snapshot, optim=True), final)
    for parent in {(folder / file.relative_path).parent for file in files}:
        fsync_folder(str(parent))


def write_sharded_manifests(folder: Path, files: list[TableFileSnapshot]) -> None:
    """Rank 0, after every rank wrote its shards: each sharded module's ``sharded_manifest.json``."""
    manifests: dict[str, dict] = {}
    for file in files:
        if file.sharded_entry is not None:
            manifests.setdefault(file.module, {**_SHARDED_FORMAT, "tables": {}})["tables"][file.table] = (
                file.sharded_entry
            )
    for module, manifest in manifests.items():
        path = folder / module / SHARDED_MANIFEST_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as handle:
            json.dump(manifest, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
