"""Reading ``torch.distributed.checkpoint`` files without unpickling anything that could run code.

DCP's own ``FileSystemReader`` reads the ``.metadata`` file with ``pickle.load`` and its default
load planner reads every non-tensor value (optimizer hyper-parameters, step counters) with
``torch.load(weights_only=False)``: a crafted file runs code on load. Here values go through
``torch.load(weights_only=True)`` (tensors, numbers, strings, containers; tensors were already read
so by DCP). The metadata is a pickle of protocol 4+, which torch's weights-only unpickler cannot
parse (it reads protocol 2 only), so it goes through Python's unpickler restricted to an explicit
allowlist of globals (Python's documented "restricting globals" pattern): DCP's metadata
dataclasses, ``torch.Size``, dtypes, layouts, memory formats and ``pathlib`` paths, each harmless
whatever arguments it is called with. Any other global (``os.system``, ``builtins.exec``, ...)
and any persistent id is refused before anything is called. Every file name the metadata holds
must be a plain name of a file inside the folder. Everything else (planning, resharding to another world size) is DCP's.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.planner import ReadItem

from gr_checkpoint.errors import UnsafeCheckpointError
from gr_checkpoint.safe_paths import check_plain_name, resolved_inside

__all__ = ["METADATA_ALLOWLIST", "SafeFileSystemReader", "SafeLoadPlanner", "load_allowlisted"]

METADATA_ALLOWLIST: list[Any] = [
    dcp_metadata.Metadata,
    dcp_metadata.MetadataIndex,
    dcp_metadata.StorageMeta,
    dcp_metadata.TensorStorageMetadata,
    dcp_metadata.BytesStorageMetadata,
    dcp_metadata.ChunkStorageMetadata,
    dcp_metadata.TensorProperties,
    dcp_metadata._MEM_FORMAT_ENCODING,
    dcp_filesystem._StorageInfo,
    pathlib.PosixPath,
    pathlib.WindowsPath,
]
"""The only globals a DCP ``.metadata`` file may name (besides torch's default weights-only ones)."""


def _allowlisted_globals() -> dict[tuple[str, str], Any]:
    allowed = {(g.__module__, g.__qualname__): g for g in METADATA_ALLOWLIST}
    for value in vars(torch).values():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", str(value).removeprefix("torch."))] = value
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    return allowed


class _AllowlistUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _allowlisted_globals().get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not on the allowlist")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def load_allowlisted(stream: io.IOBase, source: object) -> Any:
    """Unpickle ``stream`` allowing only the globals of :data:`METADATA_ALLOWLIST` (and torch's dtypes,
    layouts, memory formats, ``torch.Size``); a file naming any other raises :class:`UnsafeCheckpointError`
    naming ``source``, before anything it names is called."""
    try:
        return _AllowlistUnpickler(stream).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise UnsafeCheckpointError(source, f"refused to unpickle ({type(error).__name__}: {error})") from None


class SafeFileSystemReader(FileSystemReader):
    """A DCP ``FileSystemReader`` whose metadata is read with the weights-only unpickler and checked:
    every storage file it names is a plain name that resolves inside the folder, with no stream
    transforms (gr-checkpoint never writes any)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = pathlib.Path(self._get_metadata_path(kwargs.get("rank")))
        folder = pathlib.Path(self.path)
        resolved_inside(folder, path, path, path.name)
        with open(path, "rb") as file:
            metadata = load_allowlisted(file, path)
        self._check(metadata, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _check(self, metadata: Any, source: pathlib.Path) -> None:
        if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.storage_data, dict):
            raise UnsafeCheckpointError(
                source, f"holds a {type(metadata).__name__}, not DCP metadata with storage data"
            )
        folder = pathlib.Path(self.path)
        for info in metadata.storage_data.values():
            if not isinstance(info, dcp_filesystem._StorageInfo):
                raise UnsafeCheckpointError(source, f"storage entry is a {type(info).__name__}, not a _StorageInfo")
            name = check_plain_name(info.relative_path, source)
            resolved_inside(folder, folder / name, source, name)
            if info.transform_descriptors:
                raise UnsafeCheckpointError(source, f"{name!r} asks for stream transforms {info.transform_descriptors}")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor values with ``weights_only=True``; a refused value
    raises :class:`UnsafeCheckpointError` naming ``source`` (the DCP folder) and the value's key."""

    def __init__(self, source: object) -> None:
        super().__init__()
        self.source = source

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        key = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "")
            raise UnsafeCheckpointError(self.source, f"value {key!r}: refused to unpickle ({reason})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[key], loaded)
        else:
            self.state_dict[key] = loaded
