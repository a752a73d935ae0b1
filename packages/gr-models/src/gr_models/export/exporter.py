"""Write a trained RankingGR / RetrievalGR for serving: a `torch.export` program of its dense part, a snapshot of
its embedding tables, metadata and the loader (see `gr_models.export.loader` for what runs where)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from gr_models.configs.embedding_config import DynamicShardedEmbeddingConfig
from gr_models.data.batch import Batch
from gr_models.data.collate import collate_samples
from gr_models.data.dataset import SequenceDataset
from gr_models.export import loader
from gr_models.export.program import ServingProgram
from gr_models.model import RankingGR, RetrievalGR, SASRec
from gr_models.modules.preprocessing import HSTUPreprocessor, SequenceInputs

__all__ = ["batch_features", "export_model", "table_snapshot"]

PROGRAM, TABLES, METADATA, LOADER = "program.pt2", "tables.pt", "metadata.json", "loader.py"


def batch_features(batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A training/eval batch as the loader's `features`: name -> (ids [N], lengths [B])."""
    return {name: (jagged.values(), jagged.lengths()) for name, jagged in batch.features.to_dict().items()}


def table_snapshot(model: RankingGR | RetrievalGR) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """`({table: snapshot}, {feature: table})`. Static table: `{"weight": [V, D]}`; dynamic table:
    `{"keys": [M] sorted, "values": [M, D], "missing": [D]}` (its stored rows and its eval-mode fill)."""
    from dynamicemb import DynamicEmbInitializerMode

    embedding = model.embedding
    snapshot: dict[str, dict[str, torch.Tensor]] = {}
    table_of = {feature: embedding.table_of(feature).table_name for feature in embedding.feature_names}
    for config in {embedding.table_of(f).table_name: embedding.table_of(f) for f in embedding.feature_names}.values():
        name = config.table_name
        if isinstance(config, DynamicShardedEmbeddingConfig):
            assert embedding.dynamic is not None
            table = embedding.dynamic[name].dynamic_embedding_tables()[name]
            fill = table.options.eval_initializer_args
            if fill.mode != DynamicEmbInitializerMode.CONSTANT:
                raise NotImplementedError(
                    f"dynamic table {name!r} fills missing keys with {fill.mode.name} draws in eval mode; only a "
                    "CONSTANT eval initializer can be reproduced from a snapshot"
                )
            parts = list(table.export())
            keys = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.int64)
            values = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, config.dim)
            order = torch.argsort(keys)
            snapshot[name] = {
                "keys": keys[order].contiguous(),
                "values": values[order].float().contiguous(),
                "missing": torch.full((config.dim,), float(fill.value)),
            }
        else:
            collection = (
                embedding.model_parallel if config.sharding_type == "model_parallel" else embedding.data_parallel
            )
            assert collection is not None
            snapshot[name] = {"weight": collection.embeddings[name].weight.detach().cpu().float().clone()}
    return snapshot, table_of


def _metadata(model: RankingGR | RetrievalGR, batch: Batch, table_of: dict[str, str]) -> dict[str, Any]:
    """Feature roles (side features in the order the model adds them), the layout constants, the encodings."""
    block = model.hstu_block if isinstance(model, RankingGR) else model.backbone
    preprocessor: HSTUPreprocessor = block.preprocessor
    embedded = list(model.embedding(batch.features))  # the order the preprocessor iterates
    roles = {batch.item_feature_name, batch.action_feature_name, *batch.contextual_feature_names}
    side = [name for name in embedded if name not in roles]
    contextual_lengths = sum(
        (batch.feature_lengths(n).to(torch.int64) for n in batch.contextual_feature_names),
        torch.zeros(batch.batch_size, dtype=torch.int64),
    )
    if batch.contextual_feature_names and not bool((contextual_lengths == contextual_lengths[0]).all()):
        raise NotImplementedError("export needs every user to have the same number of contextual ids")
    position = preprocessor.position_encoder.config if preprocessor.position_encoder is not None else None
    relative = model.hstu_config.relative_bias
    item_table = model.embedding.table_of(batch.item_feature_name)
    return {
        "task": "ranking" if isinstance(model, RankingGR) else "retrieval",
        "features": {
            "item": batch.item_feature_name,
            "action": batch.action_feature_name,
            "side": side,
            "contextual": list(batch.contextual_feature_names),
            "timestamp": batch.timestamp_feature_name,
            "all": sorted(batch.features.keys()),
        },
        "table_of": table_of,
        "scaling_seqlen": preprocessor.scaling_seqlen or SequenceInputs.from_batch(batch).max_sequence_len,
        "contextual_len": int(contextual_lengths[0]) if batch.contextual_feature_names else 0,
        "position_encoding": position is not None,
        "count_from": position.count_from if position is not None else None,
        "time_encoding": bool(position is not None and position.use_time_encoding),
        "time_from": position.time_from if position is not None else None,
        "token_times": bool(relative is not None and relative.use_time and batch.timestamp_feature_name),
        "item_vocab_size": item_table.vocab_size,
        "l2_normalize": bool(isinstance(model, RetrievalGR) and model.task_config.l2_normalize),
        "num_tasks": model.num_tasks if isinstance(model, RankingGR) else None,
    }


_DIMS: dict[str, Any] = {}


def _dim_of(name: str) -> Any:
    """The symbolic size of input `name`'s first dimension; inputs of one kind of row share one."""
    kind = {
        "offsets": "batch_plus_1", "num_candidates": "batch",
        "history_rows": "history", "history_positions": "history", "history_ages": "history",
        "candidate_rows": "candidates", "candidate_positions": "candidates", "candidate_ages": "candidates",
        "candidate_index": "candidates", "source_of": "tokens", "token_times": "tokens", "max_len": "max_len",
        "query_rows": "queries", "item": "items", "action": "items",
    }.get(name, "items" if name.startswith("side:") else name.replace(":", "_"))  # fmt: skip
    if kind == "batch_plus_1":
        return _dim_of("num_candidates") + 1
    if kind not in _DIMS:
        _DIMS[kind] = Dim(kind, min=0)
    return _DIMS[kind]


def _eager_scores(model: RankingGR | RetrievalGR, batch: Batch) -> torch.Tensor:
    if isinstance(model, RankingGR):
        return model.logits(batch)
    return model.evaluate_batch(batch)["scores"]


@torch.no_grad()
def export_model(model: RankingGR | RetrievalGR, dataset: SequenceDataset, out: str | Path, *, users: int = 8) -> Path:
    """Export `model` (single-process, CPU, HSTU) into the new directory `out`, tracing it on the first `users`
    users of `dataset` (their evaluation split, with candidates). The exported program is checked against the
    eager model on that batch (equal scores) before anything is written."""
    if isinstance(model, SASRec) or not isinstance(model, (RankingGR, RetrievalGR)):
        raise NotImplementedError(f"export supports RankingGR and RetrievalGR (HSTU), not {type(model).__name__}")
    if model.is_distributed or model.device.type != "cpu":
        raise ValueError("export a single-process model on the CPU (load the checkpoint with device=cpu)")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; gr-export writes a new directory")
    model.eval()
    evaluation = dataset.with_split("eval")
    batch = collate_samples([evaluation[i] for i in range(min(users, len(evaluation)))], evaluation.schema)
    snapshot, table_of = table_snapshot(model)
    meta = _metadata(model, batch, table_of)
    program = ServingProgram(
        model,
        side_features=meta["features"]["side"],
        contextual_features=meta["features"]["contextual"],
        has_action=meta["features"]["action"] is not None,
        scaling_seqlen=meta["scaling_seqlen"],
        contextual_len=meta["contextual_len"],
    ).eval()
    tables = {feature: snapshot[table] for feature, table in table_of.items()}
    features, num_candidates = batch_features(batch), batch.num_candidates
    planned = loader.plan_inputs(meta, tables, features, num_candidates)
    inputs = planned["inputs"]
    shapes = {"inputs": {name: {0: _dim_of(name)} for name in inputs}}
    exported = torch.export.export(program, (inputs,), dynamic_shapes=shapes)
    expected = _eager_scores(model, batch)
    got = exported.module()(inputs)
    if meta["task"] == "retrieval":
        got = got @ loader.corpus(tables[meta["features"]["item"]], meta).t()
    if not torch.equal(got, expected):
        raise RuntimeError(f"the exported program differs from the model by {float((got - expected).abs().max())}")
    out.mkdir(parents=True)
    torch.export.save(exported, out / PROGRAM)
    torch.save(snapshot, out / TABLES)
    (out / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True))
    shutil.copyfile(loader.__file__, out / LOADER)
    return out
