"""Dump/load of dynamic tables, incremental dumps and scores."""

from dynamicemb.dump.api import (
    DynamicEmbDump,
    DynamicEmbLoad,
    PendingDump,
    find_dynamic_modules,
    get_score,
    incremental_dump,
    set_score,
    table_file_path,
)
from dynamicemb.dump.file_format import DynamicEmbFileError, TableFile, TableSnapshot

__all__ = [
    "DynamicEmbDump",
    "DynamicEmbFileError",
    "DynamicEmbLoad",
    "PendingDump",
    "TableFile",
    "TableSnapshot",
    "find_dynamic_modules",
    "get_score",
    "incremental_dump",
    "set_score",
    "table_file_path",
]
