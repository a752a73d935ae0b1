"""Optimizer state of static tables across the change between unsharded and sharded.

In one process a static table is an ordinary weight trained by gr-models' `SparseRowOptimizer`; in a world of
several processes a model-parallel table is sharded and trained by TorchRec's fused (TBE) optimizer. Both keep
the same AdaGrad state under other names: row-wise AdaGrad one sum of mean squared gradients per row (fused:
`<table>.momentum1` `[rows]`, row optimizer: `sum`), AdaGrad one per element (`[rows, dim]`). SGD keeps none.
This module hands a checkpoint's state of one form to a model of the other form, so a run resumed at another
size continues as the saving run would have; the fused Adam of GPU tables (bias-correction step counters kept
differently) is not carried over.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from gr_checkpoint.partial import load_tensors, tensor_keys
from gr_checkpoint.torch_state import fused_optimizer

__all__ = ["CARRIED_KINDS", "fused_state_to_row_optimizers", "row_state_to_fused_optimizer"]

_log = logging.getLogger("gr_models.trainer")

CARRIED_KINDS = ("rowwise_adagrad", "adagrad")
"""Row optimizers whose state has a fused counterpart (`momentum1`); `sgd` has no state at all."""


def _weight_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def fused_state_to_row_optimizers(
    path: Path, model: Any, optimizers: Mapping[str, torch.optim.Optimizer], tables: list[str]
) -> list[str]:
    """Give the row optimizers of `tables` (unsharded here) the fused optimizer state a sharded run saved at `path`.
    Returns the tables it found no carried state for (their state stays fresh). Collective under torch.distributed."""
    names, saved = _weight_names(model), tensor_keys(path)
    weights = dict(model.embedding.static_parameters())
    destinations: dict[str, torch.Tensor] = {}
    targets: list[tuple[torch.optim.Optimizer, torch.Tensor, str]] = []
    for table in tables:
        optimizer, weight = optimizers[table], weights[table]
        key = f"sparse_optimizer.state.{names[id(weight)]}.{table}.momentum1"
        kind = getattr(optimizer, "kind", None)
        if kind not in CARRIED_KINDS or key not in saved:
            continue
        shape = (weight.shape[0],) if kind == "rowwise_adagrad" else tuple(weight.shape)
        destinations[key] = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        targets.append((optimizer, weight, key))
    load_tensors(path, destinations)
    for optimizer, weight, key in targets:
        optimizer.state[weight] = {"sum": destinations[key]}
    carried = {key.split(".")[-2] for _, _, key in targets}
    return [table for table in tables if table not in carried and getattr(optimizers[table], "kind", "") != "sgd"]


def row_state_to_fused_optimizer(model: Any, saved_row_states: Mapping[str, Any]) -> list[str]:
    """Put the row-optimizer state an unsharded run saved (`{table: SparseRowOptimizer.state_dict()}`) into the
    fused optimizer of the tables that are sharded here, each rank its rows. Returns the tables carried over."""
    fused = fused_optimizer(model)
    if fused is None:
        return []
    state_dict = fused.state_dict()
    carried = []
    for parameter_state in state_dict["state"].values():
        for name, value in parameter_state.items():
            table, _, kind = name.rpartition(".")
            row_state = saved_row_states.get(table, {}).get("state", {})
            if kind != "momentum1" or not isinstance(value, ShardedTensor) or not row_state:
                continue
            (full,) = [entry["sum"] for entry in row_state.values()]
            for shard in value.local_shards():
                rows = shard.metadata.shard_offsets[0]
                shard.tensor.copy_(full[rows : rows + shard.tensor.shape[0]].reshape(shard.tensor.shape))
            carried.append(table)
    fused.load_state_dict(state_dict)
    return sorted(carried)
