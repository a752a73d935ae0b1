"""Dump and load the dynamic tables of standalone (unsharded, single-process) modules.

The public entry points are :mod:`dynamicemb.dump_load` (``DynamicEmbDump``, ``DynamicEmbLoad``, ...),
which call this module for standalone modules and :mod:`dynamicemb.distributed.checkpoint` for
sharded ones. ``dump_standalone(path, model)`` writes, for every module of ``model`` holding dynamic
tables (a :class:`~dynamicemb.modules.DynamicEmbModule`), one folder ``path/<module name>/`` (the
module's dotted path in the model, ``_root`` for the model itself) with one file
``<table name>.dynamicemb`` per table (format: :mod:`dynamicemb.dump.file_format`). Every file is
first written under a temporary name in its folder and flushed to disk; only when all are written
are they renamed over the previous ones, so a crash while dumping leaves the previous dump whole.
"""

from __future__ import annotations

import os
import threading
import uuid
import warnings
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from dynamicemb.dump.file_format import TableFile, TableSnapshot, path_inside, write_table_file
from dynamicemb.embedding_table import DynamicEmbeddingTable
from dynamicemb.modules.common import DynamicEmbModule

__all__ = [
    "PendingDump",
    "ScoreMap",
    "TableNames",
    "check_file_name",
    "dump_standalone",
    "export_rows",
    "find_dynamic_modules",
    "fsync_folder",
    "get_standalone_score",
    "incremental_dump_standalone",
    "load_standalone",
    "module_scores",
    "set_standalone_score",
    "table_file_path",
    "write_temporary_table_file",
]

FILE_SUFFIX = ".dynamicemb"
ROOT_NAME = "_root"

TableNames = Mapping[str, Sequence[str]] | None


def find_dynamic_modules(model: nn.Module) -> dict[str, DynamicEmbModule]:
    """Modules of ``model`` holding dynamic tables, by dotted path (``_root`` for ``model`` itself)."""
    return {name or ROOT_NAME: module for name, module in model.named_modules() if isinstance(module, DynamicEmbModule)}


def _check_single_process(pg: dist.ProcessGroup | None) -> None:
    if pg is not None and dist.get_world_size(pg) > 1:
        raise NotImplementedError(
            "dump/load across a process group of several ranks needs sharded dynamic modules; "
            "the standalone collections are single-process (pass pg=None)"
        )


def _selected_tables(model: nn.Module, table_names: TableNames) -> dict[str, dict[str, DynamicEmbeddingTable]]:
    modules = find_dynamic_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} holds no dynamic embedding module")
    selected: dict[str, dict[str, DynamicEmbeddingTable]] = {}
    if table_names is None:
        for name, module in modules.items():
            selected[name] = dict(module.dynamic_embedding_tables())
        return selected
    for module_name, names in table_names.items():
        if module_name not in modules:
            raise KeyError(f"no dynamic embedding module {module_name!r} in the model (it has {sorted(modules)})")
        tables = modules[module_name].dynamic_embedding_tables()
        unknown = [n for n in names if n not in tables]
        if unknown:
            raise KeyError(f"module {module_name!r} has no dynamic tables {unknown} (it has {sorted(tables)})")
        selected[module_name] = {n: tables[n] for n in names}
    return selected


def check_file_name(name: str) -> str:
    """``name`` if it can name a dump file or folder (no path separator, not ``.``/``..``), else ``ValueError``."""
    if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"{name!r} cannot name a dump file or folder")
    return name


def table_file_path(path: str, module_name: str, table_name: str) -> str:
    """Where :func:`dynamicemb.DynamicEmbDump` writes table ``table_name`` of module ``module_name``."""
    return os.path.join(path, check_file_name(module_name), check_file_name(table_name) + FILE_SUFFIX)


def write_temporary_table_file(final_path: str, table: DynamicEmbeddingTable | TableSnapshot, optim: bool) -> str:
    """Write ``table`` (or a snapshot of one) to a new temporary file beside ``final_path`` (synced
    to disk); returns its path."""
    folder, name = os.path.split(final_path)
    temporary = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(temporary, "wb") as f:
            if isinstance(table, TableSnapshot):
                table.write(f, optim=optim)
            else:
                write_table_file(f, table, optim=optim)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return temporary


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Flush ``folder``'s entries (files created, renamed or removed in it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dump_standalone(
    path: str,
    model: nn.Module,
    table_names: TableNames = None,
    optim: bool = False,
    pg: dist.ProcessGroup | None = None,
    *,
    blocking: bool = True,
) -> PendingDump | None:
    """:func:`dynamicemb.DynamicEmbDump` of a model holding standalone dynamic modules."""
    _check_single_process(pg)
    selected = _selected_tables(model, table_names)
    plans: list[tuple[str, DynamicEmbeddingTable | TableSnapshot]] = []
    for module_name, tables in selected.items():
        for table_name, table in tables.items():
            final_path = table_file_path(path, module_name, table_name)
            os.makedirs(os.path.dirname(final_path), exist_ok=True)
            plans.append((final_path, table if blocking else TableSnapshot.take(table)))
    if blocking:
        _write_and_replace(plans, optim)
        return None
    return PendingDump(plans, optim)


def _write_and_replace(plans: list[tuple[str, DynamicEmbeddingTable | TableSnapshot]], optim: bool) -> None:
    """Write every table to a temporary file, then rename them all over the previous dump."""
    written: list[tuple[str, str]] = []
    try:
        for final_path, table in plans:
            written.append((write_temporary_table_file(final_path, table, optim), final_path))
    except BaseException:
        for temporary, _ in written:
            os.remove(temporary)
        raise
    for temporary, final_path in written:
        os.replace(temporary, final_path)
    for folder in {os.path.dirname(final_path) for _, final_path in written}:
        fsync_folder(folder)


class PendingDump:
    """A :func:`dynamicemb.DynamicEmbDump` with ``blocking=False`` being written by a background thread."""

    def __init__(self, plans: list[tuple[str, DynamicEmbeddingTable | TableSnapshot]], optim: bool) -> None:
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(plans, optim), name="dynamicemb-dump", daemon=True)
        self._thread.start()

    def _run(self, plans: list[tuple[str, DynamicEmbeddingTable | TableSnapshot]], optim: bool) -> None:
        try:
            _write_and_replace(plans, optim)
        except BaseException as exc:  # handed to wait()
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every file is in place (``TimeoutError`` after ``timeout`` seconds); raises
        what the writer raised (the previous dump then stays whole)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the dump is still being written after {timeout} s")
        if self._error is not None:
            raise self._error


def load_standalone(
    path: str,
    model: nn.Module,
    table_names: TableNames = None,
    optim: bool = False,
    pg: dist.ProcessGroup | None = None,
) -> None:
    """:func:`dynamicemb.DynamicEmbLoad` into a model holding standalone dynamic modules."""
    _check_single_process(pg)
    selected = _selected_tables(model, table_names)
    plans: list[tuple[TableFile, DynamicEmbeddingTable]] = []
    for module_name, tables in selected.items():
        for table_name, table in tables.items():
            module_folder = path_inside(path, check_file_name(module_name), path)
            file_name = check_file_name(table_name) + FILE_SUFFIX
            table_file = TableFile.open(path_inside(module_folder, file_name, module_folder))
            table_file.check_matches(table, optim=optim)
            table_file.verify_checksum()
            plans.append((table_file, table))
    for table_file, table in plans:
        was_empty = table.size() == 0
        for chunk in table_file.rows():
            state = chunk.optimizer_state if optim else None
            table.import_rows(chunk.keys, chunk.embeddings, state, chunk.scores, cached=chunk.cached)
        if table.counter is not None:
            for keys, counts in table_file.counters():
                table.counter.load(keys, counts)
        if optim:
            table.optimizer.step = int(table_file.footer["optimizer_step"])
        table.restore_score_clock(int(table_file.footer["score_clock"]))
        if was_empty:
            _warn_if_rows_were_dropped(table_file, table)


def _warn_if_rows_were_dropped(table_file: TableFile, table: DynamicEmbeddingTable) -> None:
    """Warn when a table that was empty holds fewer rows than the file it loaded (its buckets
    overflowed: a smaller capacity, or the two tiers of a cached table folded into one)."""
    dropped = table_file.footer["num_rows"] - table.size()
    if dropped > 0:
        warnings.warn(
            f"{table_file.path}: {dropped} of {table_file.footer['num_rows']} rows could not be stored in "
            f"table {table.name!r} (capacity {table.capacity}, max_capacity {table.max_capacity}); "
            "raise max_capacity or bucket_capacity",
            RuntimeWarning,
            stacklevel=4,  # the caller of dynamicemb.DynamicEmbLoad
        )


ScoreMap = dict[str, dict[str, int | None]]


def incremental_dump_standalone(
    model: nn.Module,
    score_threshold: int | Mapping[str, Mapping[str, int]],
    pg: dist.ProcessGroup | None = None,
) -> tuple[dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], ScoreMap]:
    """:func:`dynamicemb.incremental_dump` of a model holding standalone dynamic modules."""
    _check_single_process(pg)
    if isinstance(score_threshold, int):
        selected = _selected_tables(model, None)
        thresholds = {m: dict.fromkeys(tables, score_threshold) for m, tables in selected.items()}
    else:
        selected = _selected_tables(model, {m: list(t) for m, t in score_threshold.items()})
        thresholds = {m: dict(t) for m, t in score_threshold.items()}
    dumped: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    scores: ScoreMap = {}
    for module_name, tables in selected.items():
        dumped[module_name], scores[module_name] = {}, {}
        for table_name, table in tables.items():
            dumped[module_name][table_name] = export_rows(table, thresholds[module_name][table_name])
            scores[module_name][table_name] = table.get_score()
    return dumped, scores


def export_rows(table: DynamicEmbeddingTable, min_score: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``table`` whose score is ``>= min_score``: ``(keys [M] int64, embeddings [M, dim])`` on the host."""
    parts = list(table.export(min_score=min_score))
    keys = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
    embeddings = torch.cat([p[1] for p in parts]) if parts else torch.zeros((0, table.dim), dtype=table.dtype)
    return keys, embeddings


class _WithDynamicTables(Protocol):
    def dynamic_embedding_tables(self) -> Mapping[str, DynamicEmbeddingTable]: ...


def module_scores(modules: Mapping[str, _WithDynamicTables]) -> ScoreMap | None:
    """``{module: {table: score}}`` of the dynamic tables of ``modules`` (``None`` if there are none)."""
    if not modules:
        return None
    return {
        name: {t: table.get_score() for t, table in module.dynamic_embedding_tables().items()}
        for name, module in modules.items()
    }


def get_standalone_score(model: nn.Module) -> ScoreMap | None:
    """:func:`dynamicemb.get_score` of a model holding standalone dynamic modules."""
    return module_scores(find_dynamic_modules(model))


def set_standalone_score(model: nn.Module, table_score: int | Mapping[str, Mapping[str, int]]) -> None:
    """:func:`dynamicemb.set_score` on a model holding standalone dynamic modules."""
    if isinstance(table_score, int):
        for tables in _selected_tables(model, None).values():
            for table in tables.values():
                table.set_score(table_score)
        return
    selected = _selected_tables(model, {m: list(t) for m, t in table_score.items()})
    for module_name, tables in selected.items():
        for table_name, table in tables.items():
            table.set_score(table_score[module_name][table_name])
