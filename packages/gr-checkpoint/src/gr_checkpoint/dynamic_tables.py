"""The dynamic-embedding part of a checkpoint: dynamicemb's own dump format, in ``dynamicemb_module/``.

Every module of the model that is a :class:`dynamicemb.DynamicEmbModule` (the standalone
``DynamicEmbeddingCollection`` / ``DynamicEmbeddingBagCollection``, and the sharded collections
built on it) is dumped with :func:`dynamicemb.DynamicEmbDump`, with its fused-optimizer state.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from dynamicemb import DynamicEmbDump, DynamicEmbLoad, DynamicEmbModule
from dynamicemb.dump import find_dynamic_modules
from torch import nn

from gr_checkpoint.errors import CheckpointMismatchError
from gr_checkpoint.manifest import DynamicTableSpec

__all__ = [
    "DYNAMIC_FOLDER",
    "check_dynamic_tables",
    "dump_dynamic_tables",
    "dynamic_module_names",
    "dynamic_table_specs",
    "load_dynamic_tables",
]

DYNAMIC_FOLDER = "dynamicemb_module"


def dynamic_module_names(model: nn.Module) -> list[str]:
    """Dotted paths (as in ``model.named_modules()``) of the modules holding dynamic tables."""
    return [name for name, module in model.named_modules() if isinstance(module, DynamicEmbModule)]


def dynamic_table_specs(model: nn.Module) -> dict[str, dict[str, DynamicTableSpec]]:
    """``{module name: {table name: spec}}`` of the model's dynamic tables (module names as dynamicemb's)."""
    return {
        module_name: {
            table_name: DynamicTableSpec(table.dim, str(table.dtype).removeprefix("torch."))
            for table_name, table in module.dynamic_embedding_tables().items()
        }
        for module_name, module in find_dynamic_modules(model).items()
    }


def _process_group() -> dist.ProcessGroup | None:
    return dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None


def dump_dynamic_tables(checkpoint_dir: Path, model: nn.Module) -> None:
    """Collectively dump every dynamic table of ``model`` (with optimizer state) into the checkpoint."""
    DynamicEmbDump(str(checkpoint_dir / DYNAMIC_FOLDER), model, optim=True, pg=_process_group())


def check_dynamic_tables(saved: dict[str, dict[str, DynamicTableSpec]], model: nn.Module) -> None:
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


def load_dynamic_tables(checkpoint_dir: Path, model: nn.Module) -> None:
    """Collectively load the dynamic tables (and their optimizer state) into ``model``."""
    DynamicEmbLoad(str(checkpoint_dir / DYNAMIC_FOLDER), model, optim=True, pg=_process_group())
