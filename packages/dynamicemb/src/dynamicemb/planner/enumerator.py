"""``DynamicEmbeddingEnumerator``: TorchRec's enumerator with the dynamic tables left out.

Dynamic tables are not searched over (they are always row-wise over every rank), so the
enumerator hides them from TorchRec's search space and :class:`DynamicEmbeddingShardingPlanner`
places them itself.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from torch import nn
from torchrec.distributed.planner.constants import BATCH_SIZE
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.types import ParameterConstraints, ShardEstimator, ShardingOption, Topology
from torchrec.distributed.types import ModuleSharder

from dynamicemb.planner.constraints import DynamicEmbParameterConstraints

__all__ = ["DynamicEmbeddingEnumerator", "dynamic_table_names"]


def dynamic_table_names(constraints: Mapping[str, ParameterConstraints] | None) -> set[str]:
    """Names of the tables that ``constraints`` mark ``use_dynamicemb=True``."""
    return {
        name
        for name, constraint in (constraints or {}).items()
        if isinstance(constraint, DynamicEmbParameterConstraints) and constraint.use_dynamicemb
    }


def _without_tables(sharder: ModuleSharder[nn.Module], hidden: set[str]) -> ModuleSharder[nn.Module]:
    """A shallow copy of ``sharder`` (same type, same settings) whose ``shardable_parameters``
    leaves out the ``hidden`` tables."""
    view = copy.copy(sharder)
    shardable = sharder.shardable_parameters

    def shardable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
        return {name: p for name, p in shardable(module).items() if name not in hidden}

    view.shardable_parameters = shardable_parameters  # type: ignore[method-assign]
    return view


class DynamicEmbeddingEnumerator(EmbeddingEnumerator):
    """TorchRec's ``EmbeddingEnumerator`` for models holding dynamic tables.

    Same arguments (``batch_size`` optional, TorchRec's default when ``None``); the tables that
    ``constraints`` mark ``use_dynamicemb=True`` produce no sharding options.
    """

    def __init__(
        self,
        topology: Topology,
        batch_size: int | None = None,
        constraints: dict[str, ParameterConstraints] | None = None,
        estimator: ShardEstimator | list[ShardEstimator] | None = None,
        use_exact_enumerate_order: bool | None = False,
    ) -> None:
        super().__init__(
            topology=topology,
            batch_size=batch_size if batch_size is not None else BATCH_SIZE,
            constraints=constraints,
            estimator=estimator,
            use_exact_enumerate_order=use_exact_enumerate_order,
        )
        self.dynamic_tables = dynamic_table_names(constraints)

    def enumerate(self, module: nn.Module, sharders: list[ModuleSharder[nn.Module]]) -> list[ShardingOption]:
        if not self.dynamic_tables:
            return super().enumerate(module, sharders)
        views = [_without_tables(s, self.dynamic_tables) for s in sharders]
        return super().enumerate(module, views)
