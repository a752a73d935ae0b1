"""The dynamic-embedding part of a checkpoint: dynamicemb's own dump formats, in ``dynamicemb_module/``.

Dynamic tables are hash tables, not parameters, so they never appear in a state dict; dynamicemb
dumps them with their fused-optimizer state:

- standalone modules (:class:`dynamicemb.DynamicEmbModule`: ``DynamicEmbeddingCollection``,
  ``DynamicEmbeddingBagCollection``) with :func:`dynamicemb.DynamicEmbDump` / ``DynamicEmbLoad``;
- sharded modules (:class:`dynamicemb.distributed.ShardedDynamicEmbModule`, under
  ``DistributedModelParallel``) collectively with :func:`dynamicemb.distributed.dump_sharded` /
  ``load_sharded``, which reload at another world size.

Modules are named as dynamicemb names them (dotted path; ``_root`` for the model itself).
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from torch import nn

from dynamicemb import DynamicEmbDump, DynamicEmbLoad, DynamicEmbModule
from dynamicemb.distributed import ShardedDynamicEmbModule, dump_sharded, find_sharded_modules, load_sharded
from dynamicemb.dump import find_dynamic_modules
from gr_checkpoint.errors import CheckpointMismatchError
from gr_checkpoint.manifest import DynamicTableSpec

__all__ = [
    "DYNAMIC_FOLDER",
    "check_dynamic_tables",
    "dump_dynamic_tables",
    "dynamic_table_specs",
    "load_dynamic_tables",
]

DYNAMIC_FOLDER = "dynamicemb_module"

TableSpecs = dict[str, dict[str, DynamicTableSpec]]


def dynamic_table_specs(model: nn.Module) -> TableSpecs:
    """``{module name: {table name: spec}}`` of every dynamic table of ``model``, sharded or not."""
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


def _standalone_process_group() -> dist.ProcessGroup | None:
    # Standalone modules are single-process; with several ranks dynamicemb refuses them clearly.
    return dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None


def dump_dynamic_tables(checkpoint_dir: Path, model: nn.Module) -> None:
    """Dump every dynamic table of ``model`` (with optimizer state) into the checkpoint (collective)."""
    folder = str(checkpoint_dir / DYNAMIC_FOLDER)
    if find_dynamic_modules(model):
        DynamicEmbDump(folder, model, optim=True, pg=_standalone_process_group())
    if find_sharded_modules(model):
        dump_sharded(folder, model, optim=True)


def load_dynamic_tables(checkpoint_dir: Path, model: nn.Module) -> None:
    """Load the dynamic tables (and their optimizer state) into ``model`` (collective)."""
    folder = str(checkpoint_dir / DYNAMIC_FOLDER)
    if find_dynamic_modules(model):
        DynamicEmbLoad(folder, model, optim=True, pg=_standalone_process_group())
    if find_sharded_modules(model):
        load_sharded(folder, model, optim=True)


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
