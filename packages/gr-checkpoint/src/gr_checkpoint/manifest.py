"""``manifest.json``: what a checkpoint holds, written last, checked first on load.

Fields: ``format`` ("gr-checkpoint"), ``format_version``, ``versions`` (gr-checkpoint, torch,
dynamicemb), ``world_size`` at save time, ``step`` (or null), ``model_tensors`` and
``optimizer_tensors`` (``{key: {"shape": [...], "dtype": "float32"}}``, global shapes of sharded
tensors), ``optimizer_class`` (or null), ``sparse_optimizer_tensors`` (the fused optimizer state of
a ``DistributedModelParallel``'s TorchRec tables, or null), ``dynamic_tables``
(``{module: {table: {"dim", "dtype"}}}``), ``has_extra_state``, ``files`` (``{relative path:
{"size", "crc32"}}`` of every other file of the checkpoint, see :mod:`gr_checkpoint.integrity`) and
``checksum`` (CRC32 of the manifest's own canonical JSON without this field, so a damaged manifest
that still parses is caught too).

Format versions: 3 adds ``files`` and ``checksum``; 2 stores the extra state as data
(``extra_state.pt``, see :mod:`gr_checkpoint.extra_state`) and loads without verification (with a
warning saying how to add checksums); 1 stored it pickled inside ``torch_module/`` and is read only
to refuse it (or to convert it, see :mod:`gr_checkpoint.convert`). Module and table names are
plain file names (they name folders and files of ``dynamicemb_module/``); file paths are
``/``-separated plain names.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gr_checkpoint.errors import CheckpointCorruptError, UnsafeCheckpointError
from gr_checkpoint.safe_paths import check_plain_name

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "READABLE_FORMAT_VERSIONS",
    "DynamicTableSpec",
    "FileRecord",
    "Manifest",
    "TensorSpec",
    "manifest_checksum",
    "read_manifest",
]

FORMAT_NAME = "gr-checkpoint"
FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (1, 2, 3)
CHECKSUMMED_FORMAT_VERSION = 3
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    """Global shape and dtype name (``str(dtype)`` without ``torch.``) of one saved tensor."""

    shape: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        return f"shape {list(self.shape)} {self.dtype}"


@dataclass(frozen=True)
class DynamicTableSpec:
    """Embedding dim and dtype name of one dynamic table."""

    dim: int
    dtype: str


@dataclass(frozen=True)
class FileRecord:
    """Size in bytes and zlib CRC32 of one checkpoint file."""

    size: int
    crc32: int


@dataclass(frozen=True)
class Manifest:
    """Contents of ``manifest.json`` (see the module docstring)."""

    world_size: int
    versions: dict[str, str]
    model_tensors: dict[str, TensorSpec]
    optimizer_class: str | None = None
    optimizer_tensors: dict[str, TensorSpec] = field(default_factory=dict)
    sparse_optimizer_tensors: dict[str, TensorSpec] | None = None
    dynamic_tables: dict[str, dict[str, DynamicTableSpec]] = field(default_factory=dict)
    has_extra_state: bool = False
    step: int | None = None
    files: dict[str, FileRecord] | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        body = {"format": FORMAT_NAME, **asdict(self)}
        if self.format_version >= CHECKSUMMED_FORMAT_VERSION:
            body["checksum"] = manifest_checksum(body)
        return json.dumps(body, sort_keys=True)

    def write(self, directory: Path) -> None:
        """Write ``directory/manifest.json`` and flush it to disk."""
        path = directory / MANIFEST_NAME
        with open(path, "w") as file:
            file.write(self.to_json())
            file.flush()
            os.fsync(file.fileno())


_REQUIRED_FIELDS = ("format", "format_version", "world_size", "versions", "model_tensors")
_CHECKSUMMED_FIELDS = ("files", "checksum")


def manifest_checksum(body: dict[str, Any]) -> int:
    """CRC32 of ``body`` (the manifest's JSON object) without its ``checksum`` field, as canonical JSON."""
    rest = {key: value for key, value in body.items() if key != "checksum"}
    return zlib.crc32(json.dumps(rest, sort_keys=True).encode())


def _file_path(name: Any, source: Path) -> str:
    if not isinstance(name, str):
        raise TypeError(f"file name {name!r} is not a string")
    for part in name.split("/"):
        check_plain_name(part, source)
    return name


def _file_records(raw: Any, source: Path) -> dict[str, FileRecord] | None:
    if raw is None:
        return None
    return {
        _file_path(name, source): FileRecord(size=int(record["size"]), crc32=int(record["crc32"]))
        for name, record in raw.items()
    }


def _tensor_specs(raw: Any) -> dict[str, TensorSpec]:
    return {key: TensorSpec(tuple(int(d) for d in spec["shape"]), str(spec["dtype"])) for key, spec in raw.items()}


def _dynamic_specs(raw: Any, source: Path) -> dict[str, dict[str, DynamicTableSpec]]:
    return {
        check_plain_name(module, source): {
            check_plain_name(table, source): DynamicTableSpec(int(spec["dim"]), str(spec["dtype"]))
            for table, spec in tables.items()
        }
        for module, tables in raw.items()
    }


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Parse and validate ``directory/manifest.json``.

    Raises ``FileNotFoundError`` when it is absent (not a checkpoint, or one whose save never
    finished) and :class:`CheckpointCorruptError` naming the file when it is malformed.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; {Path(directory)} is not a complete gr-checkpoint checkpoint")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointCorruptError(path, f"not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise CheckpointCorruptError(path, "the manifest is not a JSON object")
    required: tuple[str, ...] = _REQUIRED_FIELDS
    if raw.get("format_version") == CHECKSUMMED_FORMAT_VERSION:
        required += _CHECKSUMMED_FIELDS
    missing = [name for name in required if name not in raw]
    if missing:
        raise CheckpointCorruptError(path, f"missing fields {missing}")
    if raw["format"] != FORMAT_NAME:
        raise CheckpointCorruptError(path, f"format is {raw['format']!r}, expected {FORMAT_NAME!r}")
    if raw["format_version"] not in READABLE_FORMAT_VERSIONS:
        raise CheckpointCorruptError(
            path,
            f"format_version {raw['format_version']!r}; this gr-checkpoint reads versions {READABLE_FORMAT_VERSIONS}",
        )
    try:
        manifest = Manifest(
            world_size=int(raw["world_size"]),
            versions={str(k): str(v) for k, v in raw["versions"].items()},
            model_tensors=_tensor_specs(raw["model_tensors"]),
            optimizer_class=raw.get("optimizer_class"),
            optimizer_tensors=_tensor_specs(raw.get("optimizer_tensors", {})),
            sparse_optimizer_tensors=(
                None if raw.get("sparse_optimizer_tensors") is None else _tensor_specs(raw["sparse_optimizer_tensors"])
            ),
            dynamic_tables=_dynamic_specs(raw.get("dynamic_tables", {}), path),
            has_extra_state=bool(raw.get("has_extra_state", False)),
            step=None if raw.get("step") is None else int(raw["step"]),
            files=_file_records(raw["files"], path) if raw["format_version"] >= CHECKSUMMED_FORMAT_VERSION else None,
            format_version=int(raw["format_version"]),
        )
    except UnsafeCheckpointError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointCorruptError(path, f"malformed field value ({type(error).__name__}: {error})") from None
    if manifest.format_version >= CHECKSUMMED_FORMAT_VERSION and raw["checksum"] != manifest_checksum(raw):
        raise CheckpointCorruptError(
            path, f"corrupt: its checksum field says {raw['checksum']!r}, its content has {manifest_checksum(raw)}"
        )
    return manifest
