"""Per-table planner constraints: which tables are model-parallel, data-parallel or dynamic.

Constraints are TorchRec ``ParameterConstraints`` (or dynamicemb's
``DynamicEmbParameterConstraints``) keyed by table name, as TorchRec's planner takes them. A table
whose constraint allows only ``DATA_PARALLEL`` is a data-parallel table: its module stays an
ordinary replicated module whose weights are synchronized with the dense part. Every other table
is sharded by TorchRec (static) or dynamicemb (``use_dynamicemb=True``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from torch import nn
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import BaseEmbeddingConfig

__all__ = [
    "DEFAULT_MODEL_PARALLEL_SHARDING_TYPES",
    "constraints_by_child_name",
    "data_parallel_constraint",
    "is_data_parallel",
    "model_parallel_constraint",
    "sharded_embedding_constraints",
    "table_configs",
]

DATA_PARALLEL = ShardingType.DATA_PARALLEL.value
DEFAULT_MODEL_PARALLEL_SHARDING_TYPES: tuple[str, ...] = (ShardingType.ROW_WISE.value, ShardingType.TABLE_WISE.value)


def model_parallel_constraint(
    sharding_types: Sequence[str] = DEFAULT_MODEL_PARALLEL_SHARDING_TYPES,
) -> ParameterConstraints:
    """A static table sharded by TorchRec with one of ``sharding_types`` (the planner picks)."""
    if DATA_PARALLEL in sharding_types:
        raise ValueError(f"a model-parallel table cannot list {DATA_PARALLEL!r} among {list(sharding_types)}")
    return ParameterConstraints(sharding_types=list(sharding_types))


def data_parallel_constraint() -> ParameterConstraints:
    """A static table replicated on every rank, its gradient all-reduced with the dense part."""
    return ParameterConstraints(sharding_types=[DATA_PARALLEL])


def is_data_parallel(constraint: ParameterConstraints | None) -> bool:
    """Whether ``constraint`` makes a table data-parallel (``sharding_types == [DATA_PARALLEL]``)."""
    if constraint is None or constraint.sharding_types is None:
        return False
    types = list(constraint.sharding_types)
    if DATA_PARALLEL in types and len(types) > 1:
        raise ValueError(
            f"sharding_types {types} mixes {DATA_PARALLEL!r} with model-parallel types: a table is either "
            "data-parallel (only DATA_PARALLEL) or model-parallel"
        )
    return types == [DATA_PARALLEL]


def table_configs(module: nn.Module) -> list[BaseEmbeddingConfig]:
    """The TorchRec table configs of an (unsharded) embedding collection, ``[]`` for other modules."""
    for accessor in ("embedding_configs", "embedding_bag_configs"):
        if hasattr(module, accessor):
            return list(getattr(module, accessor)())
    return []


def _collections_under(module: nn.Module) -> Iterator[nn.Module]:
    for child in module.modules():
        if table_configs(child):
            yield child


def constraints_by_child_name(
    module: nn.Module, constraint_by_child: Mapping[str, ParameterConstraints]
) -> dict[str, ParameterConstraints]:
    """Constraints by table name for every table under the children of ``module`` named in
    ``constraint_by_child`` (a child may be a collection or hold collections, e.g. a ``ModuleDict``).

    Example: ``constraints_by_child_name(model.embedding, {"model_parallel": model_parallel_constraint(),
    "data_parallel": data_parallel_constraint()})``. Missing children are skipped.
    """
    constraints: dict[str, ParameterConstraints] = {}
    children = dict(module.named_children())
    for child_name, constraint in constraint_by_child.items():
        child = children.get(child_name)
        if child is None:
            continue
        for collection in _collections_under(child):
            for config in table_configs(collection):
                constraints[config.name] = constraint
    return constraints


def sharded_embedding_constraints(
    module: nn.Module, model_parallel_sharding_types: Sequence[str] = (ShardingType.ROW_WISE.value,)
) -> dict[str, ParameterConstraints]:
    """Constraints for the layout of an embedding module with children ``model_parallel`` (static
    tables sharded with ``model_parallel_sharding_types``, row-wise by default) and
    ``data_parallel`` (replicated tables), e.g. gr-models' ``ShardedEmbedding``. Its ``dynamic``
    child of standalone dynamicemb collections needs no constraint: those are sharded as
    dynamic tables with their own options.
    """
    return constraints_by_child_name(
        module,
        {
            "model_parallel": model_parallel_constraint(model_parallel_sharding_types),
            "data_parallel": data_parallel_constraint(),
        },
    )
