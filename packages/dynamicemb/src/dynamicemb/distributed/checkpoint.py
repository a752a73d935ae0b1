"""Collective dump/load of sharded dynamic tables, loadable at any world size.

``dump_sharded(path, model)`` writes, for every sharded dynamic module of ``model`` (named by its
dotted path in the unwrapped model, ``_root`` for the model itself), a folder ``path/<module>/``
holding, per table and rank ``r`` of ``W``, one file ``<table>.<dump id>.shard-<r>-of-<W>.dynamicemb``
in the single-table format of :mod:`dynamicemb.dump.file_format` (the rows of rank ``r``'s shard),
and a manifest ``sharded_manifest.json``::

    {"format": "dynamicemb-sharded-dump", "version": 1,
     "tables": {"<table>": {"dump_id": "...", "world_size": W, "key_distribution": "hash",
                            "optim": false, "files": ["<table>.<id>.shard-0-of-W.dynamicemb", ...]}}}

Every rank writes its files (under temporary names, flushed, then renamed); once all ranks
succeeded, rank 0 replaces the manifest atomically (temporary file + rename) and deletes the files
of the entries it replaced. A crash before the manifest is replaced leaves the previous dump
loadable; files of a failed dump are removed.

``load_sharded(path, model)`` reads, on every rank, the files of each table and keeps the rows
whose keys it owns under the table's current key distribution and world size (when both equal
those of the dump, rank ``r`` reads only file ``r``). A folder without a manifest entry for a
table may hold an unsharded dump (``<table>.dynamicemb`` from :func:`dynamicemb.DynamicEmbDump`),
which loads the same way. All ranks must see the same ``path`` (a shared file system across hosts).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import get_unwrapped_module

from dynamicemb.distributed.common import ShardedDynamicEmbModule
from dynamicemb.distributed.key_distribution import owner_ranks
from dynamicemb.distributed.parameter_sharding import KeyDistribution
from dynamicemb.dump.file_format import DynamicEmbFileError, TableFile, path_inside
from dynamicemb.dump.standalone import (
    ScoreMap,
    TableNames,
    check_file_name,
    export_rows,
    fsync_folder,
    module_scores,
    table_file_path,
    write_temporary_table_file,
)
from dynamicemb.embedding_table import DynamicEmbeddingTable
from dynamicemb.masks import positions

__all__ = [
    "MANIFEST_NAME",
    "dump_sharded",
    "find_sharded_modules",
    "get_sharded_score",
    "incremental_dump_sharded",
    "load_sharded",
    "set_sharded_score",
]

MANIFEST_NAME = "sharded_manifest.json"
_FORMAT = "dynamicemb-sharded-dump"
_VERSION = 1
_ROOT = "_root"
_SUFFIX = ".dynamicemb"


def find_sharded_modules(model: nn.Module) -> dict[str, ShardedDynamicEmbModule]:
    """Sharded dynamic modules of ``model`` (DMP / DDP wrappers removed), by dotted path (``_root``
    for the unwrapped model itself)."""
    root = get_unwrapped_module(model)
    return {name or _ROOT: m for name, m in root.named_modules() if isinstance(m, ShardedDynamicEmbModule)}


@dataclass
class _Selected:
    module: str
    table: DynamicEmbeddingTable
    distribution: KeyDistribution
    group: dist.ProcessGroup


def _select(model: nn.Module, table_names: TableNames, pg: dist.ProcessGroup | None) -> list[_Selected]:
    modules = find_sharded_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} holds no sharded dynamic embedding module")
    wanted = (
        table_names
        if table_names is not None
        else {m: list(mod.dynamic_embedding_tables()) for m, mod in modules.items()}
    )
    selected: list[_Selected] = []
    for module_name, names in wanted.items():
        if module_name not in modules:
            raise KeyError(f"no sharded dynamic module {module_name!r} in the model (it has {sorted(modules)})")
        module = modules[module_name]
        tables = module.dynamic_embedding_tables()
        unknown = [n for n in names if n not in tables]
        if unknown:
            raise KeyError(f"module {module_name!r} has no dynamic tables {unknown} (it has {sorted(tables)})")
        group = module.process_group
        if pg is not None and (dist.get_world_size(pg), dist.get_rank(pg)) != (
            dist.get_world_size(group),
            dist.get_rank(group),
        ):
            raise ValueError(f"pg does not match the process group module {module_name!r} is sharded over")
        for name in names:
            selected.append(_Selected(module_name, tables[name], module.key_distributions()[name], group))
    return selected


def _group_of(selected: list[_Selected]) -> dist.ProcessGroup:
    groups = {id(s.group): s.group for s in selected}
    if len(groups) != 1:
        raise NotImplementedError("dump/load of sharded modules over different process groups in one call")
    return next(iter(groups.values()))


def _agree(ok: bool, error: str, group: dist.ProcessGroup) -> None:
    """Raise on every rank if any rank failed (``error`` names what failed here)."""
    statuses: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(statuses, (ok, error), group=group)
    failures = [f"rank {r}: {e}" for r, (good, e) in enumerate(statuses) if not good]
    if failures:
        raise RuntimeError("sharded dynamic-table checkpoint failed: " + "; ".join(failures))


def _shard_file_name(table: str, dump_id: str, rank: int, world_size: int) -> str:
    return f"{table}.{dump_id}.shard-{rank}-of-{world_size}{_SUFFIX}"


def _read_manifest(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.exists(path):
        return {"format": _FORMAT, "version": _VERSION, "tables": {}}
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise DynamicEmbFileError(path, f"unreadable manifest ({error})") from None
    if manifest.get("format") != _FORMAT or manifest.get("version") != _VERSION or "tables" not in manifest:
        raise DynamicEmbFileError(path, f"not a {_FORMAT} manifest of version {_VERSION}")
    return manifest


def _write_manifest(folder: str, manifest: dict[str, Any]) -> None:
    final = os.path.join(folder, MANIFEST_NAME)
    temporary = os.path.join(folder, f".{MANIFEST_NAME}.tmp-{uuid.uuid4().hex}")
    with open(temporary, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, final)
    fsync_folder(folder)


def _write_shard(final_path: str, table: DynamicEmbeddingTable, optim: bool) -> None:
    temporary = write_temporary_table_file(final_path, table, optim)
    try:
        os.replace(temporary, final_path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def dump_sharded(
    path: str,
    model: nn.Module,
    table_names: TableNames = None,
    optim: bool = False,
    pg: dist.ProcessGroup | None = None,
) -> None:
    """Collective: write every rank's shard of the dynamic tables of ``model`` under ``path``
    (keys, embeddings, scores, options; optimizer state and step if ``optim``).

    ``table_names``: ``{module name: [table names]}`` to dump only those (other tables' entries in
    an existing manifest are kept). ``pg``: the process group of the sharded modules (default:
    theirs).
    """
    selected = _select(model, table_names, pg)
    group = _group_of(selected)
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    box: list[Any] = [uuid.uuid4().hex[:16] if rank == 0 else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    dump_id: str = box[0]
    written: list[str] = []
    error = ""
    try:
        for s in selected:
            folder = os.path.join(path, check_file_name(s.module))
            os.makedirs(folder, exist_ok=True)
            final = os.path.join(folder, _shard_file_name(check_file_name(s.table.name), dump_id, rank, world_size))
            _write_shard(final, s.table, optim)
            written.append(final)
    except Exception as exc:  # reported to every rank by _agree
        error = f"{type(exc).__name__}: {exc}"
    try:
        _agree(not error, error, group)
    except RuntimeError:
        for final in written:
            os.remove(final)
        raise
    error = ""
    if rank == 0:
        try:
            _commit(path, selected, dump_id, world_size, optim)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
    _agree(not error, error, group)


def _commit(path: str, selected: list[_Selected], dump_id: str, world_size: int, optim: bool) -> None:
    """Rank 0: point each folder's manifest at the new files, then delete the files it replaced."""
    by_module: dict[str, list[_Selected]] = {}
    for s in selected:
        by_module.setdefault(s.module, []).append(s)
    for module, entries in by_module.items():
        folder = os.path.join(path, module)
        manifest = _read_manifest(folder)
        replaced: list[str] = []
        for s in entries:
            old = manifest["tables"].get(s.table.name)
            if old is not None:
                replaced.extend(old["files"])
            manifest["tables"][s.table.name] = {
                "dump_id": dump_id,
                "world_size": world_size,
                "key_distribution": s.distribution.value,
                "optim": optim,
                "files": [_shard_file_name(s.table.name, dump_id, r, world_size) for r in range(world_size)],
            }
        _write_manifest(folder, manifest)
        for name in replaced:
            stale = os.path.join(folder, name)
            if os.path.exists(stale):
                os.remove(stale)


@dataclass
class _LoadPlan:
    selected: _Selected
    headers: list[TableFile]
    to_read: list[TableFile]


def _plan_load(path: str, s: _Selected, optim: bool, rank: int, world_size: int) -> _LoadPlan:
    folder = path_inside(path, check_file_name(s.module), path)
    entry = _read_manifest(folder)["tables"].get(s.table.name)
    if entry is None:
        single = path_inside(folder, os.path.basename(table_file_path(path, s.module, s.table.name)), folder)
        if not os.path.exists(single):
            raise FileNotFoundError(
                f"{folder}: no dump of table {s.table.name!r} "
                f"(no entry in {MANIFEST_NAME}, no {os.path.basename(single)})"
            )
        headers = [TableFile.open(single)]
        same_layout = False
    else:
        manifest_path = os.path.join(folder, MANIFEST_NAME)
        headers = [TableFile.open(path_inside(folder, name, manifest_path)) for name in entry["files"]]
        same_layout = entry["world_size"] == world_size and entry["key_distribution"] == s.distribution.value
    for header in headers:
        header.check_matches(s.table, optim=optim)
    to_read = [headers[rank]] if same_layout else headers
    for header in to_read:
        header.verify_checksum()
    return _LoadPlan(s, headers, to_read)


def load_sharded(
    path: str,
    model: nn.Module,
    table_names: TableNames = None,
    optim: bool = False,
    pg: dist.ProcessGroup | None = None,
) -> None:
    """Collective: load a dump written by :func:`dump_sharded` at any world size and key
    distribution (or by :func:`dynamicemb.DynamicEmbDump` from an unsharded module) into the
    sharded dynamic tables of ``model``; every rank keeps the rows it owns.

    Loaded keys replace rows of the same keys; other rows stay. All files are checked (format,
    checksum, table name, dim, dtype, optimizer layout with ``optim``) on every rank before any
    table changes; a problem raises on every rank. With ``optim`` the optimizer state and step
    (the largest step among the dumped shards) are restored.
    """
    selected = _select(model, table_names, pg)
    group = _group_of(selected)
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    plans: list[_LoadPlan] = []
    error = ""
    try:
        plans = [_plan_load(path, s, optim, rank, world_size) for s in selected]
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    _agree(not error, error, group)
    for plan in plans:
        table, distribution = plan.selected.table, plan.selected.distribution
        for header in plan.to_read:
            for chunk in header.rows():
                keys = chunk.keys
                mine = positions(owner_ranks(keys, world_size, distribution) == rank)
                if mine.numel():
                    state = chunk.optimizer_state
                    kept_state = state[mine] if optim and state is not None else None
                    table.import_rows(
                        keys[mine], chunk.embeddings[mine], kept_state, chunk.scores[mine], cached=chunk.cached
                    )
            if table.counter is not None:  # admission counts of keys not yet admitted, to the keys' owners
                for keys, counts in header.counters():
                    mine = positions(owner_ranks(keys, world_size, distribution) == rank)
                    if mine.numel():
                        table.counter.load(keys[mine], counts[mine])
        if optim:
            table.optimizer.step = max(int(h.footer["optimizer_step"]) for h in plan.headers)
        table.restore_score_clock(max(int(h.footer["score_clock"]) for h in plan.headers))


def incremental_dump_sharded(
    model: nn.Module,
    score_threshold: int | Mapping[str, Mapping[str, int]],
    pg: dist.ProcessGroup | None = None,
) -> tuple[dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], ScoreMap]:
    """This rank's rows whose score is ``>= score_threshold`` (rows touched since the threshold
    was taken from :func:`get_sharded_score` on this rank); the ranks' results are disjoint and
    together form the whole incremental dump. Not a collective.

    ``score_threshold``: one int for every table, or ``{module: {table: threshold}}``. Returns
    ``({module: {table: (keys [M] int64, embeddings [M, dim])}}, {module: {table: score now}})``
    on the host.
    """
    if isinstance(score_threshold, int):
        selected = _select(model, None, pg)
        thresholds = {(s.module, s.table.name): score_threshold for s in selected}
    else:
        selected = _select(model, {m: list(t) for m, t in score_threshold.items()}, pg)
        thresholds = {(m, t): v for m, tables in score_threshold.items() for t, v in tables.items()}
    dumped: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    scores: ScoreMap = {}
    for s in selected:
        dumped.setdefault(s.module, {})[s.table.name] = export_rows(s.table, thresholds[(s.module, s.table.name)])
        scores.setdefault(s.module, {})[s.table.name] = s.table.get_score()
    return dumped, scores


def get_sharded_score(model: nn.Module) -> ScoreMap | None:
    """``{module: {table: score}}`` of this rank's shards (``None`` for LFU tables; ``None`` if the
    model has no sharded dynamic module)."""
    return module_scores(find_sharded_modules(model))


def set_sharded_score(model: nn.Module, table_score: int | Mapping[str, Mapping[str, int]]) -> None:
    """Set the score of the next training lookups of this rank's CUSTOMIZED shards: one int for
    every table, or ``{module: {table: score}}``."""
    if isinstance(table_score, int):
        for s in _select(model, None, None):
            s.table.set_score(table_score)
        return
    for s in _select(model, {m: list(t) for m, t in table_score.items()}, None):
        s.table.set_score(table_score[s.module][s.table.name])
