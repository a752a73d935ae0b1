"""Dump files of dynamic tables (:mod:`~dynamicemb.dump.file_format`) and the dump/load of standalone
modules (:mod:`~dynamicemb.dump.standalone`). The public entry points, for standalone and sharded
modules alike, are in :mod:`dynamicemb.dump_load`."""

from dynamicemb.dump.file_format import DynamicEmbFileError, TableFile, TableSnapshot
from dynamicemb.dump.standalone import PendingDump, find_dynamic_modules, fsync_folder, table_file_path

__all__ = [
    "DynamicEmbFileError",
    "PendingDump",
    "TableFile",
    "TableSnapshot",
    "find_dynamic_modules",
    "fsync_folder",
    "table_file_path",
]
