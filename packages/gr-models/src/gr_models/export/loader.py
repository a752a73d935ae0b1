"""Score batches with a model written by `gr-export` (this file is copied into every export as `loader.py`).

It needs only torch and hstu_attn (whose `hstu_attn::forward` op the program calls), not gr_models:

    import loader                                # from the export directory
    scorer = loader.load("export_dir")
    logits = scorer.score(features, num_candidates)   # ranking: [sum k, num_tasks]
    scores, users = scorer.score(features, num_candidates)   # retrieval: [U, num_items], [U]

Retrieval: one query per user with at least one history event (`users`), the output after the last history
event, scored against every item id; candidates, if the batch has any, are not part of the query.

`features` maps every feature name of `scorer.metadata["features"]` to `(ids [N] int64, lengths [B] int64)`, the
layout of training batches: per user the item sequence is history items then its `num_candidates[b]` candidates;
the action feature (ranking) has one id per item (candidates' ids are ignored: they are what is predicted);
side features and the timestamp feature are aligned with the items; contextual features have their own lengths.

What runs where: the embedding tables are looked up here, from the snapshot `tables.pt` (static tables: the
weight matrix; dynamic tables: their stored keys and rows, a key not stored gets the table's evaluation fill, as
the trained table does in eval mode). The integer bookkeeping of the token layout (offsets, which row goes where,
positions, time gaps) is computed here too. Everything with learned parameters (embedding scaling, position and
time encodings, the HSTU layers, the prediction head or the query normalization) is the `torch.export` program
`program.pt2`. Retrieval scores are `queries @ normalized item table^T`, computed here.
"""

from __future__ import annotations

import contextlib
import json
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ExportedScorer", "UnsafeExportError", "corpus", "load", "load_program", "lookup", "plan_inputs"]

Features = dict[str, tuple[Tensor, Tensor]]


def _offsets(lengths: Tensor) -> Tensor:
    lengths = lengths.to(torch.int64)
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def _coordinates(lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Per token of sequences with `lengths [B]`: its sequence `[N]` and its position in it `[N]`."""
    lengths = lengths.to(torch.int64)
    total = int(lengths.sum())
    ids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=total)
    return ids, torch.arange(total) - _offsets(lengths)[:-1][ids]


def lookup(table: dict[str, Tensor], ids: Tensor) -> Tensor:
    """`[N, D]` rows of a table snapshot for `ids [N]`."""
    if "weight" in table:
        weight = table["weight"]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]):
            raise ValueError(f"ids must lie in [0, {weight.shape[0]}), got {int(ids.min())}..{int(ids.max())}")
        return weight.index_select(0, ids)
    keys, rows = table["keys"], table["values"]  # keys sorted ascending
    where = torch.searchsorted(keys, ids).clamp(max=max(keys.numel() - 1, 0))
    found = keys[where] == ids if keys.numel() else torch.zeros_like(ids, dtype=torch.bool)
    fill = table["missing"].expand(ids.numel(), -1)
    picked = rows.index_select(0, where) if keys.numel() else fill
    return torch.where(found.unsqueeze(1), picked, fill)


def _ages(meta: dict, times: Tensor, history_rows: Tensor, candidate_rows: Tensor, plan: dict) -> tuple[Tensor, Tensor]:
    """Time gaps of history and candidate items as the model's preprocessing measures them."""
    item_ids, history_ids, candidate_ids = plan["item_ids"], plan["history_ids"], plan["candidate_ids"]
    history_times, candidate_times = times[history_rows], times[candidate_rows]
    batch = plan["history_lengths"].numel()
    if meta["time_from"] == "previous":
        event = plan["event"]
        previous = torch.where(event == 0, history_times, history_times.roll(1))
        last = torch.zeros(batch, dtype=torch.int64).scatter_reduce(
            0, history_ids, history_times, "amax", include_self=False
        )
        has_history = plan["history_lengths"][candidate_ids] > 0
        candidate_ages = torch.where(
            has_history, candidate_times - last[candidate_ids], torch.zeros_like(candidate_times)
        )
        return history_times - previous, candidate_ages
    query = torch.zeros(batch, dtype=torch.int64).scatter_reduce(0, item_ids, times, "amax", include_self=False)
    return query[history_ids] - history_times, query[candidate_ids] - candidate_times


def plan_inputs(meta: dict, tables: dict[str, dict[str, Tensor]], features: Features, num_candidates: Tensor) -> dict:
    """`{"inputs": the program's inputs for one batch}` (see the module docstring), plus `"users" [U]` for
    retrieval; `tables` maps each feature name to its table's snapshot."""
    names = meta["features"]
    missing = [n for n in names["all"] if n not in features]
    if missing:
        raise ValueError(f"the batch lacks features {missing}")
    item_ids, item_lengths = (t.to(torch.int64) for t in features[names["item"]])
    num_candidates = num_candidates.to(torch.int64)
    history_lengths = item_lengths - num_candidates
    if bool((history_lengths < 0).any()):
        raise ValueError("num_candidates exceeds the item sequence length of some user")
    for name in [*names["side"], *([names["action"]] if names["action"] else [])]:
        if not torch.equal(features[name][1].to(torch.int64), item_lengths):
            raise ValueError(f"feature {name!r} must have the same per-user lengths as the items")
    owner, position = _coordinates(item_lengths)
    is_candidate = position >= (item_lengths - num_candidates)[owner]
    history_rows, candidate_rows = (~is_candidate).nonzero().squeeze(1), is_candidate.nonzero().squeeze(1)
    inputs: dict[str, Tensor] = {"item": lookup(tables[names["item"]], item_ids)}
    for name in names["side"]:
        inputs[f"side:{name}"] = lookup(tables[name], features[name][0].to(torch.int64))
    if names["action"]:
        inputs["action"] = lookup(tables[names["action"]], features[names["action"]][0].to(torch.int64))
    stride = 2 if names["action"] else 1
    context_lengths = [features[n][1].to(torch.int64) for n in names["contextual"]]
    context_total = sum(context_lengths, torch.zeros_like(item_lengths))
    if names["contextual"] and not bool((context_total == meta["contextual_len"]).all()):
        raise ValueError(f"every user needs {meta['contextual_len']} contextual ids, as when exported")
    lengths = context_total + stride * history_lengths + num_candidates
    offsets = _offsets(lengths)
    starts = offsets[:-1]
    destinations, consumed = [], torch.zeros_like(item_lengths)
    for name, context in zip(names["contextual"], context_lengths):
        inputs[f"contextual:{name}"] = lookup(tables[name], features[name][0].to(torch.int64))
        ids, pos = _coordinates(context)
        destinations.append(starts[ids] + consumed[ids] + pos)
        consumed = consumed + context
    history_ids, event = _coordinates(history_lengths)
    history_index = starts[history_ids] + context_total[history_ids] + stride * event
    candidate_ids, candidate_pos = _coordinates(num_candidates)
    candidate_index = (
        starts[candidate_ids] + context_total[candidate_ids] + stride * history_lengths[candidate_ids] + candidate_pos
    )
    destinations += [history_index, *([history_index + 1] if names["action"] else []), candidate_index]
    total = int(offsets[-1])
    source_of = torch.empty(total, dtype=torch.int64)
    source_of[torch.cat(destinations)] = torch.arange(total)
    inputs.update(
        history_rows=history_rows, candidate_rows=candidate_rows, source_of=source_of, offsets=offsets,
        num_candidates=num_candidates, max_len=torch.empty(int(lengths.max()) if lengths.numel() else 0, 0),
    )  # fmt: skip
    if meta["position_encoding"]:
        if meta["count_from"] == "start":
            inputs["history_positions"] = event
            inputs["candidate_positions"] = history_lengths[candidate_ids] + candidate_pos
        else:
            inputs["history_positions"] = history_lengths[history_ids] - event
            inputs["candidate_positions"] = torch.zeros_like(candidate_pos)
    plan = {"item_ids": owner, "history_ids": history_ids, "candidate_ids": candidate_ids, "event": event}
    plan["history_lengths"] = history_lengths
    if meta["time_encoding"] or meta["token_times"]:
        times = features[names["timestamp"]][0].to(torch.int64)
        if meta["time_encoding"]:
            inputs["history_ages"], inputs["candidate_ages"] = _ages(meta, times, history_rows, candidate_rows, plan)
        if meta["token_times"]:
            query = torch.zeros(item_lengths.numel(), dtype=torch.int64).scatter_reduce(
                0, owner, times, "amax", include_self=False
            )
            token_times = query.repeat_interleave(lengths, output_size=total)
            token_times = token_times.index_put((history_index,), times[history_rows])
            token_times = token_times.index_put((history_index + int(bool(names["action"])),), times[history_rows])
            inputs["token_times"] = token_times.index_put((candidate_index,), times[candidate_rows])
    if meta["task"] == "ranking":
        inputs["candidate_index"] = candidate_index
        return {"inputs": inputs}
    users = torch.nonzero(history_lengths > 0).squeeze(1)
    last_event = _offsets(history_lengths)[users] + history_lengths[users] - 1
    inputs["query_rows"] = (history_index + int(bool(names["action"])))[last_event]  # token of each query
    return {"inputs": inputs, "users": users}


def corpus(item_table: dict[str, Tensor], meta: dict) -> Tensor:
    """`[V, D]` embeddings of item ids `0..V-1` from the item table's snapshot, L2-normalized as the model's."""
    ids = torch.arange(meta["item_vocab_size"])
    rows = torch.cat([lookup(item_table, part) for part in ids.split(65536)])
    return F.normalize(rows, dim=-1, eps=1e-6) if meta["l2_normalize"] else rows


class UnsafeExportError(RuntimeError):
    """An exported program holds data that only an unrestricted unpickler could read (it could run code)."""


@contextlib.contextmanager
def _no_unpickling(path: Path) -> Iterator[None]:
    """Within the block, `torch.load` reads weights only and the other unpicklers `torch.export.load` may call
    raise: `torch.export.load` falls back to `torch.load(weights_only=False)` when a weights-only read fails,
    and unpickles constants an archive marks as pickled, so a crafted `program.pt2` would run code."""
    originals = (torch.load, pickle.loads, torch._C._pickle_load_obj)

    def refuse(*args: object, **kwargs: object) -> None:
        raise UnsafeExportError(f"{path}: holds objects that only an unrestricted unpickler reads; not loaded")

    def weights_only_load(*args: object, weights_only: bool | None = None, **kwargs: object) -> object:
        if weights_only is False:
            refuse()
        return originals[0](*args, weights_only=True, **kwargs)  # type: ignore[arg-type]

    torch.load, pickle.loads, torch._C._pickle_load_obj = weights_only_load, refuse, refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load, pickle.loads, torch._C._pickle_load_obj = originals  # type: ignore[assignment]


def load_program(path: str | Path) -> torch.export.ExportedProgram:
    """`torch.export.load(path)` without unpickling anything but tensors (raises `UnsafeExportError`)."""
    with _no_unpickling(Path(path)):
        return torch.export.load(path)


class ExportedScorer:
    """A loaded export: `score(features, num_candidates)` (see the module docstring)."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        import hstu_attn  # noqa: F401  (registers the hstu_attn::forward op the program calls)

        self.metadata = json.loads((directory / "metadata.json").read_text())
        snapshot = torch.load(directory / "tables.pt", weights_only=True)
        # feature name -> its table's snapshot
        self.tables: dict[str, dict[str, Tensor]] = {f: snapshot[t] for f, t in self.metadata["table_of"].items()}
        self.program = load_program(directory / "program.pt2").module()
        self._corpus: Tensor | None = None

    def corpus(self) -> Tensor:
        """`[V, D]` (normalized) item embeddings of ids `0..V-1` (retrieval), computed once."""
        if self._corpus is None:
            self._corpus = corpus(self.tables[self.metadata["features"]["item"]], self.metadata)
        return self._corpus

    @torch.no_grad()
    def score(self, features: Features, num_candidates: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        planned = plan_inputs(self.metadata, self.tables, features, num_candidates)
        output = self.program(planned["inputs"])
        if self.metadata["task"] == "ranking":
            return output
        return output @ self.corpus().t(), planned["users"]


def load(directory: str | Path) -> ExportedScorer:
    """Load an export written by `gr-export`."""
    return ExportedScorer(directory)
