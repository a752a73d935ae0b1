"""The dynamic-embedding part of a checkpoint: dynamicemb's own dump formats, in ``dynamicemb_module/``.

Dynamic tables are hash tables, not parameters, so they never appear in a state dict; dynamicemb
dumps them with their fused-optimizer state:

- standalone modules (:class:`dynamicemb.DynamicEmbModule`: ``DynamicEmbeddingCollection``,
  ``DynamicEmbeddingBagCollection``) with :func:`dynamicemb.DynamicEmbDump` / ``DynamicEmbLoad``;
- sharded modules (:class:`dynamicemb.distributed.ShardedDynamicEmbModule`, under
  ``DistributedModelParallel`` or sharded in place by ``gr_parallel``) collectively with
  :func:`dynamicemb.distributed.checkpoint.dump_sharded` / ``load_sharded``, which reload at another world size
  (and read a standalone module's dump, so one process's checkpoint loads into a sharded model).

A standalone module loads a sharded dump too: it takes the rows of every rank's file (a checkpoint of N
ranks loads into one process). Standalone modules are single-process tables: in a world of several ranks each
rank would hold its own unsynchronized copy, which no checkpoint can represent, so saving or loading such a
model there raises :class:`StandaloneDynamicTablesError` saying what to use instead.

Modules are named as dynamicemb names them (dotted path; ``_root`` for the model itself).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
from torch import nn

from dynamicemb import DynamicEmbDump, DynamicEmbLoad, DynamicEmbModule
from dynamicemb.distributed import ShardedDynamicEmbModule, find_sharded_modules
from dynamicemb.distributed.checkpoint import MANIFEST_NAME as SHARDED_MANIFEST_NAME
from dynamicemb.distributed.checkpoint import dump_sharded, load_sharded
from dynamicemb.dump import TableFile, find_dynamic_modules
from dynamicemb.dump.file_format import path_inside
from dynamicemb.embedding_table import DynamicEmbeddingTable
from gr_checkpoint.errors import CheckpointCorruptError, CheckpointMismatchError
from gr_checkpoint.manifest import DynamicTableSpec
from gr_checkpoint.safe_paths import check_plain_name

__all__ = [
    "DYNAMIC_FOLDER",
    "StandaloneDynamicTablesError",
    "check_dynamic_tables",
    "dump_dynamic_tables",
    "dynamic_table_specs",
    "load_dynamic_tables",
]

DYNAMIC_FOLDER = "dynamicemb_module"

TableSpecs = dict[str, dict[str, DynamicTableSpec]]


class StandaloneDynamicTablesError(NotImplementedError):
    """A model with standalone (unsharded) dynamic modules saved or loaded in a world of several ranks."""


def _refuse_standalone_in_world(model: nn.Module) -> None:
    standalone = sorted(find_dynamic_modules(model))
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if standalone and world_size > 1:
        raise StandaloneDynamicTablesError(
            f"the model holds standalone dynamicemb modules {standalone} in a world of {world_size} ranks: each "
            "rank has its own unsynchronized copy of their tables, which a checkpoint cannot hold. Shard them over "
            "the ranks (gr_parallel.distribute / shard_embedding_modules, or TorchRec's DistributedModelParallel "
            "with dynamicemb's DynamicEmbeddingCollectionSharder): their checkpoint then loads at any world size, "
            "a single process's included. Or save and load the standalone model from one process."
        )


def dynamic_table_specs(model: nn.Module) -> TableSpecs:
    """``{module name: {table name: spec}}`` of every dynamic table of ``model``, sharded or not.

    Raises :class:`StandaloneDynamicTablesError` for standalone modules in a world of several ranks.
    """
    _refuse_standalone_in_world(model)
    modules: dict[str, DynamicEmbModule | ShardedDynamicEmbModule] = {
        **find_dynamic_modules(model),
        **find_sharded_modules(model),
    }
    return {
        module_name: {
            table_name: DynamicTableSpec(table.dim, str(table.dtype).removeprefix("torch."))
            for table_name, table in module.dynamic_embedding_tables().items()
        }
        for module_name, module in modules.items()
    }


def dump_dynamic_tables(checkpoint_dir: Path, model: nn.Module) -> None:
    """Dump every dynamic table of ``model`` (with optimizer state) into the checkpoint (collective)."""
    _refuse_standalone_in_world(model)
    folder = str(checkpoint_dir / DYNAMIC_FOLDER)
    if find_dynamic_modules(model):
        DynamicEmbDump(folder, model, optim=True)
    if find_sharded_modules(model):
        dump_sharded(folder, model, optim=True)


def load_dynamic_tables(checkpoint_dir: Path, model: nn.Module) -> None:
    """Load the dynamic tables (and their optimizer state) into ``model`` (collective)."""
    _refuse_standalone_in_world(model)
    folder = checkpoint_dir / DYNAMIC_FOLDER
    standalone = find_dynamic_modules(model)
    sharded_dumps = {name: files for name in standalone if (files := _sharded_dump_files(folder, name))}
    if sharded_dumps:
        _load_sharded_dumps_into_standalone(sharded_dumps, standalone)
    if set(standalone) - set(sharded_dumps):
        table_names = {name: list(module.dynamic_embedding_tables()) for name, module in standalone.items()}
        unsharded = {name: tables for name, tables in table_names.items() if name not in sharded_dumps}
        DynamicEmbLoad(str(folder), model, table_names=unsharded, optim=True)
    if find_sharded_modules(model):
        load_sharded(str(folder), model, optim=True)


def _sharded_dump_files(folder: Path, module_name: str) -> dict[str, list[Path]]:
    """``{table: [shard file, ...]}`` of a module's sharded dump (written by several ranks); ``{}`` when the
    module's folder holds a single-process dump instead."""
    module_folder = folder / check_plain_name(module_name, folder)
    manifest_path = module_folder / SHARDED_MANIFEST_NAME
    if not manifest_path.is_file():
        return {}
    try:
        tables = json.loads(manifest_path.read_text())["tables"]
        return {
            table: [Path(path_inside(str(module_folder), name, str(manifest_path))) for name in entry["files"]]
            for table, entry in tables.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointCorruptError(manifest_path, f"unreadable sharded dump manifest ({error})") from None


def _load_sharded_dumps_into_standalone(
    dumps: dict[str, dict[str, list[Path]]], modules: dict[str, DynamicEmbModule]
) -> None:
    """Every rank's rows (with optimizer state, scores and admission counts) into the standalone tables; every
    file is checked (name, dim, dtype, optimizer layout, checksum) before any table changes."""
    plans: list[tuple[DynamicEmbeddingTable, list[TableFile]]] = []
    for module_name, tables_files in dumps.items():
        for table_name, table in modules[module_name].dynamic_embedding_tables().items():
            if table_name not in tables_files:
                raise CheckpointMismatchError(f"dynamic table {module_name}/{table_name} has no dump in the checkpoint")
            files = [TableFile.open(str(path)) for path in tables_files[table_name]]
            for file in files:
                file.check_matches(table, optim=True)
                file.verify_checksum()
            plans.append((table, files))
    for table, files in plans:
        for file in files:
            for chunk in file.rows():
                table.import_rows(
                    chunk.keys, chunk.embeddings, chunk.optimizer_state, chunk.scores, cached=chunk.cached
                )
            if table.counter is not None:
                for keys, counts in file.counters():
                    table.counter.load(keys, counts)
        table.optimizer.step = max(int(file.footer["optimizer_step"]) for file in files)
        table.restore_score_clock(max(int(file.footer["score_clock"]) for file in files))


def check_dynamic_tables(saved: TableSpecs, model: nn.Module) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``model`` has exactly the saved dynamic tables."""
    current = dynamic_table_specs(model)
    problems = []
    for module_name in sorted(saved.keys() | current.keys()):
        saved_tables, current_tables = saved.get(module_name, {}), current.get(module_name, {})
        for table_name in sorted(saved_tables.keys() | current_tables.keys()):
            where = f"dynamic table {module_name}/{table_name}"
            if table_name not in current_tables:
                problems.append(f"{where} is in the checkpoint but not in the model")
            elif table_name not in saved_tables:
                problems.append(f"{where} is in the model but not in the checkpoint")
            elif saved_tables[table_name] != current_tables[table_name]:
                s, c = saved_tables[table_name], current_tables[table_name]
                problems.append(f"{where}: checkpoint has dim {s.dim} {s.dtype}, model has dim {c.dim} {c.dtype}")
    if problems:
        raise CheckpointMismatchError("; ".join(problems))
