"""The public dump/load API: ``DynamicEmbDump``, ``DynamicEmbLoad``, ``incremental_dump``, scores.

Each function works on any model holding dynamic tables: standalone modules
(:mod:`dynamicemb.dump.standalone`, single-process) or TorchRec-sharded ones
(:mod:`dynamicemb.distributed.checkpoint`, collective over the modules' process group, loadable at
another world size). A model may not mix the two kinds.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from dynamicemb.distributed import checkpoint as sharded
from dynamicemb.dump import standalone
from dynamicemb.dump.standalone import PendingDump, ScoreMap, TableNames

__all__ = ["DynamicEmbDump", "DynamicEmbLoad", "get_score", "incremental_dump", "set_score"]


def _is_sharded(model: nn.Module) -> bool:
    """True when ``model`` holds TorchRec-sharded dynamic modules; a model may not mix them with
    standalone ones."""
    if not sharded.find_sharded_modules(model):
        return False
    if standalone.find_dynamic_modules(model):
        raise NotImplementedError(
            "this model holds both sharded and standalone dynamic embedding modules; dump/load one kind per call"
        )
    return True


def DynamicEmbDump(
    path: str,
    model: nn.Module,
    table_names: TableNames = None,
    optim: bool = False,
    pg: dist.ProcessGroup | None = None,
    *,
    blocking: bool = True,
) -> PendingDump | None:
    """Write the dynamic tables of ``model`` (keys, embeddings, scores; optimizer state and step if
    ``optim``; options) under ``path``.

    ``table_names``: ``{module name: [table names]}`` to dump only those (module names as in
    :func:`~dynamicemb.dump.find_dynamic_modules`). Cached tables are dumped from their cache and their backing
    storage (the cache wins for keys in both).

    ``blocking=False`` (standalone modules): copy every table to host memory now (a snapshot: the
    dump holds the tables as they are at this call, at the cost of that much host memory), write
    the files from a background thread while training goes on, and return a :class:`PendingDump`
    whose ``wait()`` returns when the files are in place (or raises what the writer raised).
    """
    if _is_sharded(model):
        if not blocking:
            raise NotImplementedError("a non-blocking dump of sharded dynamic modules is not implemented")
        sharded.dump_sharded(path, model, table_names, optim, pg)
        return None
    return standalone.dump_standalone(path, model, table_names, optim, pg, blocking=blocking)


def DynamicEmbLoad(
    path: str,
    model: nn.Module,
    table_names: TableNames = None,
    optim: bool = False,
    pg: dist.ProcessGroup | None = None,
) -> None:
    """Load tables written by :func:`dynamicemb.DynamicEmbDump` into the dynamic tables of ``model``.

    Loaded keys replace rows of the same keys; other rows stay. Every file is checked first (format,
    size, checksum, table name, dim, dtype and, with ``optim``, the optimizer state layout), so a
    bad file raises :class:`~dynamicemb.dump.file_format.DynamicEmbFileError` (a ``ValueError``
    naming the file and the problem) before any table changes. With ``optim`` the optimizer state
    and step are restored; without, loaded rows start from a fresh optimizer state. Rows dumped
    from the device cache of a cached table go back into the cache, the others into its backing
    storage. The counts of keys not yet admitted are restored into a table with an admission
    strategy (dumps without them leave its counter as it is).
    """
    if _is_sharded(model):
        return sharded.load_sharded(path, model, table_names, optim, pg)
    return standalone.load_standalone(path, model, table_names, optim, pg)


def incremental_dump(
    model: nn.Module,
    score_threshold: int | Mapping[str, Mapping[str, int]],
    pg: dist.ProcessGroup | None = None,
) -> tuple[dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], ScoreMap]:
    """Keys (and embeddings) whose score is ``>= score_threshold``: the rows touched since the
    threshold was taken from :func:`get_score`.

    ``score_threshold``: one int for every table, or ``{module name: {table name: threshold}}``
    for only those tables. Returns ``({module: {table: (keys [M] int64, embeddings [M, dim])}},
    {module: {table: score}})`` on the host, the scores being :func:`get_score` now (the threshold
    for the next incremental dump) for the tables dumped.
    """
    if _is_sharded(model):
        return sharded.incremental_dump_sharded(model, score_threshold, pg)
    return standalone.incremental_dump_standalone(model, score_threshold, pg)


def get_score(model: nn.Module) -> ScoreMap | None:
    """``{module: {table: score}}``: each table's :meth:`~dynamicemb.DynamicEmbeddingTable.get_score` (``None``
    for LFU tables); ``None`` if the model has no dynamic tables."""
    if _is_sharded(model):
        return sharded.get_sharded_score(model)
    return standalone.get_standalone_score(model)


def set_score(model: nn.Module, table_score: int | Mapping[str, Mapping[str, int]]) -> None:
    """Set the score of the next training lookups of CUSTOMIZED tables: one int for every table of
    the model, or ``{module: {table: score}}``."""
    if _is_sharded(model):
        return sharded.set_sharded_score(model, table_score)
    return standalone.set_standalone_score(model, table_score)
