"""Reading chosen tensors of a checkpoint's ``torch_module/`` into tensors of one's own.

For state a model keeps in another form than the one that saved it, e.g. the fused optimizer state of a table
sharded when saved and unsharded now (gr-models' trainer hands it to its row optimizer). Keys are DCP's flattened
names, as :func:`tensor_keys` lists them (``sparse_optimizer.state.<parameter>.<table>.momentum1``). The files
are read as :func:`gr_checkpoint.load` reads them (no code runs, names stay inside the folder); call this after a
:func:`~gr_checkpoint.load` of the same checkpoint, which checks the whole of it first.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from gr_checkpoint.errors import CheckpointMismatchError
from gr_checkpoint.safe_dcp import SafeFileSystemReader, SafeLoadPlanner
from gr_checkpoint.safe_paths import resolved_inside

__all__ = ["load_tensors", "tensor_keys"]

_TORCH_FOLDER = "torch_module"


def _reader(path: str | os.PathLike[str]) -> tuple[Path, SafeFileSystemReader]:
    directory = Path(path)
    folder = resolved_inside(directory, directory / _TORCH_FOLDER, directory, _TORCH_FOLDER)
    return folder, SafeFileSystemReader(folder)


def tensor_keys(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """``{DCP key: global shape}`` of every tensor in the checkpoint's ``torch_module/``."""
    _, reader = _reader(path)
    metadata = reader.read_metadata()
    return {
        key: tuple(entry.size)
        for key, entry in metadata.state_dict_metadata.items()
        if hasattr(entry, "size")  # tensors; other entries are bytes (hyper-parameters)
    }


def load_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor]) -> None:
    """Fill ``tensors`` (``{DCP key: tensor of the saved global shape}``) in place from the checkpoint at ``path``.

    Collective under ``torch.distributed`` (every rank passes its own tensors, whole or as DTensor/ShardedTensor
    pieces). A key that is absent or a shape that differs raises :class:`CheckpointMismatchError` naming it.
    """
    folder, reader = _reader(path)
    saved = tensor_keys(path)
    problems = [f"{key!r} is not in {folder}" for key in tensors if key not in saved]
    problems += [
        f"{key!r}: checkpoint has shape {list(saved[key])}, the destination {list(tensor.shape)}"
        for key, tensor in tensors.items()
        if key in saved and tuple(tensor.shape) != saved[key]
    ]
    if problems:
        raise CheckpointMismatchError("cannot read tensors: " + "; ".join(problems))
    with warnings.catch_warnings():  # DCP's note that it runs without a process group: intended in one process
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*assuming the intent is to")
        dcp.load(dict(tensors), storage_reader=reader, planner=SafeLoadPlanner(folder))
