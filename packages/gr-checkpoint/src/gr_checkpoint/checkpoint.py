"""``save`` / ``load`` of a model, its optimizer and extra training state.

On-disk layout of a checkpoint directory::

    manifest.json        what is inside (see gr_checkpoint.manifest); written last
    torch_module/        torch.distributed.checkpoint files: model state (without dynamic tables),
                         optimizer state
    extra_state.pt       the extra state as data (see gr_checkpoint.extra_state), if any
    dynamicemb_module/   dynamicemb dump of the dynamic tables (only if the model has any)

Loading never unpickles anything that could run code (see gr_checkpoint.safe_dcp and
gr_checkpoint.extra_state) and never reads outside the checkpoint folder (gr_checkpoint.safe_paths).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal, overload

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._state_dict_utils import _create_cpu_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torchrec.optim.keyed import KeyedOptimizer

import dynamicemb
from gr_checkpoint.async_save import (
    SaveHandle,
    checkpoint_group,
    snapshot_state,
    snapshot_value,
    start_background_save,
    wait_for_saves,
)
from gr_checkpoint.atomic import (
    discard_staging,
    prepare_staging,
    publish,
    resolve_checkpoint_dir,
    run_on_rank_zero,
    staging_dir,
)
from gr_checkpoint.collective import agree, broadcast_from_zero, rank_and_world
from gr_checkpoint.dynamic_tables import (
    DYNAMIC_FOLDER,
    check_dynamic_tables,
    dump_dynamic_tables,
    dynamic_table_specs,
    load_dynamic_tables,
)
from gr_checkpoint.errors import CheckpointCorruptError, CheckpointMismatchError, LegacyCheckpointError
from gr_checkpoint.extra_state import encode_extra_state, read_extra_state, write_extra_state
from gr_checkpoint.integrity import record_checkpoint_files, verify_checkpoint_files
from gr_checkpoint.manifest import MANIFEST_NAME, Manifest, read_manifest
from gr_checkpoint.safe_dcp import SafeFileSystemReader, SafeLoadPlanner
from gr_checkpoint.safe_paths import check_no_escaping_links, resolved_inside
from gr_checkpoint.table_snapshots import snapshot_tables, write_sharded_manifests, write_table_snapshots
from gr_checkpoint.torch_state import (
    SPARSE_OPTIMIZER,
    check_tensor_specs,
    collect_torch_state,
    fused_optimizer,
    restore_torch_state,
    tensor_specs,
)

__all__ = ["TORCH_FOLDER", "SaveHandle", "load", "save"]

TORCH_FOLDER = "torch_module"


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
        if isinstance(first, CheckpointCorruptError):
            raise first from failure
        raise error(f"rank {rank}: {type(first).__name__}: {first}") from failure


@overload
def save(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra_state: Any = None,
    step: int | None = None,
    asynchronous: Literal[False] = False,
    on_published: Callable[[], None] | None = None,
) -> Path: ...


@overload
def save(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra_state: Any = None,
    step: int | None = None,
    asynchronous: Literal[True],
    on_published: Callable[[], None] | None = None,
) -> SaveHandle: ...


def save(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra_state: Any = None,
    step: int | None = None,
    asynchronous: bool = False,
    on_published: Callable[[], None] | None = None,
) -> Path | SaveHandle:
    """Write a checkpoint of ``model`` (and ``optimizer``, and ``extra_state``) to directory ``path``.

    Collective: with an initialized process group every rank calls it with its own shard of the
    state. Dynamic tables (standalone or sharded dynamicemb modules) go to ``dynamicemb_module/``
    (dynamicemb's dump, with their fused-optimizer state); the model's state dict (which holds no
    dynamic table rows), the optimizer and ``extra_state`` to ``torch_module/``
    (``torch.distributed.checkpoint``, so it loads at another world size). Every file's size and
    CRC32 go into the manifest, written last.

    ``extra_state``: data (``None``, numbers, strings, lists, tuples, dicts, torch tensors, numeric
    NumPy values: step counters, RNG states, data-loader position, optimizer and scheduler state
    dicts), stored without pickling objects (see :mod:`gr_checkpoint.extra_state`); any other value
    raises :class:`~gr_checkpoint.UnsafeExtraStateError` naming its key and type before anything
    is written. Rank 0's value is kept. ``step`` is recorded in the manifest. The save is atomic: an
    existing checkpoint at ``path`` is replaced only once the new one is complete. ``on_published``
    runs on rank 0 once it is (its failure raises on every rank). Returns ``Path(path)``.

    ``asynchronous=True``: copy everything to host memory now, write it from a background thread
    and return a :class:`~gr_checkpoint.SaveHandle` at once (``wait()`` returns the path when the
    checkpoint is published, or raises what the writer raised); see :mod:`gr_checkpoint.async_save`.
    Any save or load first waits for this process's pending asynchronous save.
    """
    target = Path(path)
    wait_for_saves()
    if extra_state is not None:
        encode_extra_state(extra_state)  # refuses what cannot be stored as data, before any file is touched
    run_on_rank_zero(lambda: prepare_staging(target))
    staging = staging_dir(target)
    try:
        dynamic_tables = dynamic_table_specs(model)
        sparse_optimizer = fused_optimizer(model)
        state: dict[str, Any] = collect_torch_state(model, optimizer, sparse_optimizer)
        manifest = Manifest(
            world_size=dist.get_world_size() if dist.is_initialized() else 1,
            versions=_versions(),
            model_tensors=tensor_specs(state["model"]),
            optimizer_class=None if optimizer is None else type(optimizer).__name__,
            optimizer_tensors={} if optimizer is None else tensor_specs(state["optimizer"]["state"]),
            sparse_optimizer_tensors=(
                None if sparse_optimizer is None else tensor_specs(state[SPARSE_OPTIMIZER]["state"])
            ),
            dynamic_tables=dynamic_tables,
            has_extra_state=extra_state is not None,
            step=step,
        )
        if asynchronous:
            return _start_background_save(target, model, state, manifest, extra_state, on_published)
        if dynamic_tables:
            dump_dynamic_tables(staging, model)
        with _quiet_single_process(), _dcp_failures_as(lambda problem: RuntimeError(f"saving {target}: {problem}")):
            dcp.save(state, storage_writer=dcp.FileSystemWriter(staging / TORCH_FOLDER))
        _seal_and_publish(target, manifest, extra_state)
        if on_published is not None:
            run_on_rank_zero(on_published)
    except BaseException:
        if rank_and_world()[0] == 0:
            discard_staging(target)
        raise
    return target


def _start_background_save(
    target: Path,
    model: nn.Module,
    state: dict[str, Any],
    manifest: Manifest,
    extra_state: Any,
    on_published: Callable[[], None] | None,
) -> SaveHandle:
    """Snapshot the tables, the state and the extra state to host memory; write them in the background."""
    group = checkpoint_group()
    dump_id = broadcast_from_zero(uuid.uuid4().hex[:16])
    tables = snapshot_tables(model, dump_id) if manifest.dynamic_tables else []
    dense = snapshot_state(state)
    extra = snapshot_value(extra_state)
    staging = staging_dir(target)

    def write() -> None:
        try:
            agree(lambda: write_table_snapshots(staging / DYNAMIC_FOLDER, tables), group)
            run_on_rank_zero(lambda: write_sharded_manifests(staging / DYNAMIC_FOLDER, tables), group)
            writer = dcp.FileSystemWriter(staging / TORCH_FOLDER)
            with _dcp_failures_as(lambda problem: RuntimeError(f"saving {target}: {problem}")):
                dcp.save(dense, storage_writer=writer, process_group=group, no_dist=not dist.is_initialized())
            _seal_and_publish(target, manifest, extra, group)
            if on_published is not None:
                run_on_rank_zero(on_published, group)
        except BaseException:
            if rank_and_world(group)[0] == 0:
                discard_staging(target)
            raise

    return start_background_save(target, write)


def _seal_and_publish(
    target: Path, manifest: Manifest, extra_state: Any, group: dist.ProcessGroup | None = None
) -> None:
    """Collective, once every rank's files are in the staging folder: write the extra state, checksum
    every file, write the manifest (with the checksums) and move the folder into place."""
    staging = staging_dir(target)
    if extra_state is not None:
        run_on_rank_zero(lambda: write_extra_state(staging, extra_state), group)
    files = record_checkpoint_files(staging, group)
    sealed = dataclasses.replace(manifest, files=files)

    def finish() -> None:
        sealed.write(staging)
        publish(target)

    run_on_rank_zero(finish, group)


def _sparse_optimizer_to_load(directory: Path, manifest: Manifest, model: nn.Module) -> KeyedOptimizer | None:
    """The DMP fused optimizer to restore, when both the model has one and the checkpoint holds its state."""
    sparse_optimizer = fused_optimizer(model)
    if sparse_optimizer is not None and manifest.sparse_optimizer_tensors is None:
        warnings.warn(
            f"{directory} was not saved from a DistributedModelParallel: the fused optimizer state of its "
            "TorchRec tables starts fresh",
            stacklevel=3,
        )
        return None
    if sparse_optimizer is None and manifest.sparse_optimizer_tensors:
        warnings.warn(
            f"{directory} holds the fused optimizer state of a DistributedModelParallel's TorchRec tables; "
            "the model given is not one, so that state is not loaded",
            stacklevel=3,
        )
    return sparse_optimizer


def _legacy_refusal(directory: Path) -> LegacyCheckpointError:
    return LegacyCheckpointError(
        directory / MANIFEST_NAME,
        "format 1 checkpoint with a pickled extra state, which could run code when loaded; refused. "
        f"If you trust it, convert it once with: gr-checkpoint convert --trust {directory}",
    )


def _read_checked(directory: Path) -> Manifest:
    """The manifest of ``directory``, after checking that nothing in it links outside it."""
    check_no_escaping_links(directory)
    manifest = read_manifest(directory)
    if manifest.format_version == 1 and manifest.has_extra_state:
        raise _legacy_refusal(directory)
    return manifest


def load(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Any:
    """Load a checkpoint written by :func:`save` into ``model`` (and ``optimizer``); return its extra state.

    Collective like :func:`save`; the world size may differ from the one that saved. All or
    nothing: first every file's size and CRC32 are checked against the manifest (each rank
    checks a share), then the manifest against the model (a missing or unexpected key, or a
    different shape or dtype, raises :class:`CheckpointMismatchError` naming the key and both
    shapes); the dense state is read into copies, the dynamic tables are loaded (dynamicemb
    checks every table file before a table changes) and only then are the copies put into the
    model and optimizers, so any failure leaves model, optimizers and tables as they were. A
    missing manifest raises ``FileNotFoundError``; a malformed manifest, a missing, truncated
    or corrupt file :class:`CheckpointCorruptError`, each naming the file. Without ``optimizer``
    only the model is loaded. Returns the ``extra_state`` given to :func:`save` (``None`` if
    there was none). Format-2 checkpoints (no checksums) load unverified, with a warning.

    Loading runs no code from the files: anything that would (a pickled callable or class outside
    the weights-only allowlist) or that names a file outside the checkpoint folder (``..``, a path
    separator, an absolute path, a symbolic link leading out) raises
    :class:`~gr_checkpoint.UnsafeCheckpointError` naming the file. A format-1 checkpoint with a
    pickled extra state raises :class:`~gr_checkpoint.LegacyCheckpointError` saying how to convert it.
    """
    wait_for_saves()
    directory = resolve_checkpoint_dir(Path(path))
    manifest = _read_checked(directory)
    _verify_files(directory, manifest)
    if optimizer is not None and manifest.optimizer_class is None:
        raise CheckpointMismatchError(f"{directory} holds no optimizer state, but an optimizer was given to load()")
    if optimizer is not None and manifest.optimizer_class != type(optimizer).__name__:
        raise CheckpointMismatchError(
            f"{directory} holds {manifest.optimizer_class} state; the optimizer given is {type(optimizer).__name__}"
        )
    check_dynamic_tables(manifest.dynamic_tables, model)
    sparse_optimizer = _sparse_optimizer_to_load(directory, manifest, model)
    model_only = collect_torch_state(model, None, None)
    check_tensor_specs("model", manifest.model_tensors, tensor_specs(model_only["model"]))
    fresh_optimizer = optimizer is not None and not optimizer.state
    try:
        return _load_checked(directory, manifest, model, optimizer, sparse_optimizer)
    except BaseException:
        if fresh_optimizer and optimizer is not None:
            optimizer.state.clear()  # collect_torch_state filled it with zeros (lr 0 step); back to empty
        raise


def _verify_files(directory: Path, manifest: Manifest) -> None:
    """Every file's size and checksum (format 3), before anything is read; format 2 only warns."""
    if manifest.files is None:
        warnings.warn(
            f"{directory} is a format-{manifest.format_version} checkpoint without checksums: its files are not "
            f"verified; save it again (or run: gr-checkpoint convert --trust {directory}) to add them",
            stacklevel=3,
        )
        return
    verify_checkpoint_files(directory, manifest.files)


def _load_checked(
    directory: Path,
    manifest: Manifest,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    sparse_optimizer: KeyedOptimizer | None,
) -> Any:
    """Read everything into copies, load the dynamic tables (dynamicemb checks every file before a
    table changes), then copy the dense state into the model and optimizers: a failure before that
    last step leaves them as they were."""
    state: dict[str, Any] = collect_torch_state(model, optimizer, sparse_optimizer)
    if optimizer is not None:
        check_tensor_specs("optimizer", manifest.optimizer_tensors, tensor_specs(state["optimizer"]["state"]))
    if sparse_optimizer is not None and manifest.sparse_optimizer_tensors is not None:
        sparse_specs = tensor_specs(state[SPARSE_OPTIMIZER]["state"])
        check_tensor_specs("sparse optimizer", manifest.sparse_optimizer_tensors, sparse_specs)
    extra_state = read_extra_state(directory) if manifest.has_extra_state else None
    torch_folder = resolved_inside(directory, directory / TORCH_FOLDER, directory, TORCH_FOLDER)
    reader = SafeFileSystemReader(torch_folder)
    if (torch_folder / ".metadata").is_file():
        reader.read_metadata()  # refuses unsafe metadata with its own error (inside DCP it becomes an assertion)
    loaded = _create_cpu_state_dict(state)  # read into copies: the model is untouched if reading fails
    with _quiet_single_process(), _dcp_failures_as(lambda problem: CheckpointCorruptError(torch_folder, problem)):
        dcp.load(loaded, storage_reader=reader, planner=SafeLoadPlanner(torch_folder))
    if manifest.dynamic_tables:
        load_dynamic_tables(directory, model)
    restore_torch_state(model, optimizer, sparse_optimizer, loaded)
    return extra_state
