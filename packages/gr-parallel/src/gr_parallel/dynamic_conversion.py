"""Standalone dynamicemb collections -> TorchRec collections that dynamicemb's sharders shard.

A ``dynamicemb.DynamicEmbeddingCollection`` (or ``DynamicEmbeddingBagCollection``) holds whole,
unsharded tables with their own options and optimizer. To shard it, it is replaced in its parent
by a TorchRec ``EmbeddingCollection`` (``EmbeddingBagCollection``) of the same configs on the
meta device; each table gets a ``DynamicEmbParameterConstraints(use_dynamicemb=True)`` with the
module's table options (capacities per shard: the whole-table capacities divided over the ranks)
and the module gets its optimizer as fused parameters. Tables must still be empty.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from dynamicemb import (
    DynamicEmbeddingBagCollection,
    DynamicEmbeddingCollection,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbParameterConstraints,
    DynamicEmbTableOptions,
)
from dynamicemb.embedding_table import DynamicEmbeddingTable

__all__ = ["ConvertedDynamicModules", "convert_dynamic_modules", "optimizer_fused_params"]

STANDALONE_TYPES = (DynamicEmbeddingCollection, DynamicEmbeddingBagCollection)


@dataclass
class ConvertedDynamicModules:
    """What :func:`convert_dynamic_modules` replaced: per table its constraint, per module path its
    fused parameters (the module's optimizer)."""

    constraints: dict[str, DynamicEmbParameterConstraints] = field(default_factory=dict)
    fused_params_by_module: dict[str, dict[str, Any]] = field(default_factory=dict)


def optimizer_fused_params(args: DynamicEmbOptimizerArgs) -> dict[str, Any]:
    """TorchRec ``fused_params`` that dynamicemb reads back as ``args`` (``ValueError`` if it cannot)."""
    params: dict[str, Any] = {
        "optimizer": args.optimizer.name,
        "learning_rate": args.learning_rate,
        "beta1": args.beta1,
        "beta2": args.beta2,
        "eps": args.eps,
        "weight_decay": args.weight_decay,
        "gradient_clipping": args.gradient_clipping,
        "max_gradient": args.max_gradient,
    }
    if args.optimizer is DynamicEmbOptimizerType.ADAMW:
        params["weight_decay_mode"] = "DECOUPLE"
    if DynamicEmbOptimizerArgs.from_fused_params(params) != args:
        raise ValueError(f"the optimizer {args} cannot be expressed as TorchRec fused_params for sharding")
    return params


def _per_shard(capacity: int | None, world_size: int) -> int | None:
    return None if capacity is None else max(1, math.ceil(capacity / world_size))


def _shard_options(options: DynamicEmbTableOptions, world_size: int) -> DynamicEmbTableOptions:
    """Options of one shard: ``max_capacity`` and ``init_capacity`` of a whole standalone table
    divided over ``world_size`` ranks (``None`` stays ``None``: inferred from ``num_embeddings``)."""
    return dataclasses.replace(
        options,
        max_capacity=_per_shard(options.max_capacity, world_size),
        init_capacity=_per_shard(options.init_capacity, world_size),
    )


def _single_optimizer(path: str, tables: dict[str, DynamicEmbeddingTable]) -> DynamicEmbOptimizerArgs:
    optimizers = {table.optimizer.args for table in tables.values()}
    if len(optimizers) != 1:
        raise ValueError(f"{path}: the tables of one dynamic collection must share one optimizer, got {optimizers}")
    return optimizers.pop()


def _torchrec_twin(module: nn.Module) -> nn.Module:
    meta = torch.device("meta")
    if isinstance(module, DynamicEmbeddingCollection):
        return EmbeddingCollection(tables=module.embedding_configs(), device=meta, need_indices=module.need_indices())
    assert isinstance(module, DynamicEmbeddingBagCollection)
    return EmbeddingBagCollection(tables=module.embedding_bag_configs(), is_weighted=module.is_weighted(), device=meta)


def _check_empty(path: str, tables: dict[str, DynamicEmbeddingTable]) -> None:
    filled = {name: table.size() for name, table in tables.items() if table.size()}
    if filled:
        raise ValueError(
            f"{path}: dynamic tables {filled} (keys stored) already hold rows; shard the module before it "
            "trains or loads rows (the rows of an unsharded table are not redistributed)"
        )


def convert_dynamic_modules(
    root: nn.Module, world_size: int, user_constraints: dict[str, Any]
) -> ConvertedDynamicModules:
    """Replace, in place, every standalone dynamic collection under ``root`` (not ``root`` itself)
    by its TorchRec twin on the meta device. A table with a ``DynamicEmbParameterConstraints`` in
    ``user_constraints`` keeps that constraint; the others get one from the module's options."""
    if isinstance(root, STANDALONE_TYPES):
        raise TypeError(
            f"cannot shard a {type(root).__name__} in place: pass the module that holds it "
            "(sharding replaces the collection inside its parent)"
        )
    converted = ConvertedDynamicModules()
    targets = [(path, module) for path, module in root.named_modules() if isinstance(module, STANDALONE_TYPES)]
    for path, module in targets:
        tables = dict(module.dynamic_embedding_tables())
        _check_empty(path, tables)
        converted.fused_params_by_module[path] = optimizer_fused_params(_single_optimizer(path, tables))
        for name, table in tables.items():
            given = user_constraints.get(name)
            if isinstance(given, DynamicEmbParameterConstraints) and given.use_dynamicemb:
                converted.constraints[name] = given
            elif given is not None:
                raise ValueError(
                    f"table {name!r} lives in a dynamic collection ({path}); its constraint must be a "
                    f"DynamicEmbParameterConstraints(use_dynamicemb=True), got {given!r}"
                )
            else:
                converted.constraints[name] = DynamicEmbParameterConstraints(
                    use_dynamicemb=True, dynamicemb_options=_shard_options(table.options, world_size)
                )
        parent_path, _, attribute = path.rpartition(".")
        setattr(root.get_submodule(parent_path), attribute, _torchrec_twin(module))
    return converted
