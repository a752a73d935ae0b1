"""``save`` / ``load`` of a model, its optimizer and extra training state.

On-disk layout of a checkpoint directory::

    manifest.json        what is inside (see gr_checkpoint.manifest); written last
    torch_module/        torch.distributed.checkpoint files: model state (without dynamic tables),
                         optimizer state, extra state
    dynamicemb_module/   dynamicemb dump of every dynamic embedding module (only if there is one)
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import dynamicemb
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from gr_checkpoint.atomic import (
    discard_staging,
    prepare_staging,
    publish,
    resolve_checkpoint_dir,
    run_on_rank_zero,
    staging_dir,
)
from gr_checkpoint.dynamic_tables import (
    check_dynamic_tables,
    dump_dynamic_tables,
    dynamic_module_names,
    dynamic_table_specs,
    load_dynamic_tables,
)
from gr_checkpoint.errors import CheckpointCorruptError, CheckpointMismatchError
from gr_checkpoint.manifest import Manifest, read_manifest
from gr_checkpoint.torch_state import check_tensor_specs, collect_torch_state, restore_torch_state, tensor_specs

__all__ = ["TORCH_FOLDER", "load", "save"]

TORCH_FOLDER = "torch_module"
_EXTRA_STATE_KEY = "extra_state"


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _versions() -> dict[str, str]:
    return {
        "gr-checkpoint": _package_version("gr-checkpoint"),
        "torch": torch.__version__,
        "dynamicemb": dynamicemb.__version__,
    }


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Silence DCP's warning that it runs in a single process: without a process group that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*assuming the intent is to")
        yield


@contextlib.contextmanager
def _dcp_failures_as(error: Callable[[str], Exception]) -> Iterator[None]:
    """Re-raise DCP's ``CheckpointException`` (a ``BaseException``) as ``error(first rank's problem)``."""
    try:
        yield
    except CheckpointException as failure:
        rank, (first, _) = next(iter(sorted(failure.failures.items())))
        raise error(f"rank {rank}: {type(first).__name__}: {first}") from failure


def _serialized(extra_state: Any) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(extra_state, buffer)
    buffer.seek(0)
    return buffer


def save(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra_state: Any = None,
    step: int | None = None,
) -> Path:
    """Write a checkpoint of ``model`` (and ``optimizer``, and ``extra_state``) to directory ``path``.

    Collective: with an initialized process group every rank calls it with its own shard of the
    state. Dynamic embedding modules go to ``dynamicemb_module/`` (dynamicemb's dump, with their
    fused-optimizer state); the rest of the model, the optimizer and ``extra_state`` to
    ``torch_module/`` (``torch.distributed.checkpoint``, so it loads at another world size).

    ``extra_state``: any picklable object (step counters, RNG states, data-loader position);
    rank 0's value is kept. ``step`` is recorded in the manifest. The save is atomic: an existing
    checkpoint at ``path`` is replaced only once the new one is complete. Returns ``Path(path)``.
    """
    target = Path(path)
    run_on_rank_zero(lambda: prepare_staging(target))
    staging = staging_dir(target)
    try:
        dynamic_modules = dynamic_module_names(model)
        if dynamic_modules:
            dump_dynamic_tables(staging, model)
        state: dict[str, Any] = collect_torch_state(model, optimizer, dynamic_modules)
        manifest = Manifest(
            world_size=dist.get_world_size() if dist.is_initialized() else 1,
            versions=_versions(),
            model_tensors=tensor_specs(state["model"]),
            optimizer_class=None if optimizer is None else type(optimizer).__name__,
            optimizer_tensors={} if optimizer is None else tensor_specs(state["optimizer"]["state"]),
            dynamic_tables=dynamic_table_specs(model),
            has_extra_state=extra_state is not None,
            step=step,
        )
        if extra_state is not None and (not dist.is_initialized() or dist.get_rank() == 0):
            state[_EXTRA_STATE_KEY] = _serialized(extra_state)
        with _quiet_single_process(), _dcp_failures_as(lambda problem: RuntimeError(f"saving {target}: {problem}")):
            dcp.save(state, storage_writer=dcp.FileSystemWriter(staging / TORCH_FOLDER))
        run_on_rank_zero(lambda: (manifest.write(staging), publish(target)))
    except BaseException:
        if not dist.is_initialized() or dist.get_rank() == 0:
            discard_staging(target)
        raise
    return target


def load(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Any:
    """Load a checkpoint written by :func:`save` into ``model`` (and ``optimizer``); return its extra state.

    Collective like :func:`save`; the world size may differ from the one that saved. Before
    the model is changed, the manifest is checked against it: a missing or unexpected key,
    or a different shape or dtype, raises :class:`CheckpointMismatchError` naming the key and
    both shapes; a missing manifest raises ``FileNotFoundError`` and a malformed one
    :class:`CheckpointCorruptError`, each naming the file; so does unreadable data in
    ``torch_module/`` (found while reading, so the model may then be partly loaded). Without
    ``optimizer`` only the model is loaded. Returns the ``extra_state`` given to :func:`save` (``None`` if there was none).
    """
    directory = resolve_checkpoint_dir(Path(path))
    manifest = read_manifest(directory)
    if optimizer is not None and manifest.optimizer_class is None:
        raise CheckpointMismatchError(f"{directory} holds no optimizer state, but an optimizer was given to load()")
    if optimizer is not None and manifest.optimizer_class != type(optimizer).__name__:
        raise CheckpointMismatchError(
            f"{directory} holds {manifest.optimizer_class} state; the optimizer given is {type(optimizer).__name__}"
        )
    check_dynamic_tables(manifest.dynamic_tables, model)
    dynamic_modules = dynamic_module_names(model)
    model_only = collect_torch_state(model, None, dynamic_modules)
    check_tensor_specs("model", manifest.model_tensors, tensor_specs(model_only["model"]))
    state: dict[str, Any] = (
        model_only if optimizer is None else collect_torch_state(model, optimizer, dynamic_modules)
    )
    if optimizer is not None:
        check_tensor_specs("optimizer", manifest.optimizer_tensors, tensor_specs(state["optimizer"]["state"]))
    if manifest.has_extra_state:
        state[_EXTRA_STATE_KEY] = io.BytesIO()
    torch_folder = directory / TORCH_FOLDER
    with _quiet_single_process(), _dcp_failures_as(lambda problem: CheckpointCorruptError(torch_folder, problem)):
        dcp.load(state, storage_reader=dcp.FileSystemReader(torch_folder))
    restore_torch_state(model, optimizer, state)
    if dynamic_modules:
        load_dynamic_tables(directory, model)
    if not manifest.has_extra_state:
        return None
    serialized = state[_EXTRA_STATE_KEY]
    serialized.seek(0)
    return torch.load(serialized, weights_only=False)
