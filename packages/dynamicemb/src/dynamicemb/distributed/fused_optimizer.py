"""The dynamic tables' in-backward optimizers as a TorchRec ``FusedOptimizer`` (learning rates only).

A dynamic table updates its rows inside the backward pass with the hyper-parameters of its
:class:`~dynamicemb.DynamicEmbOptimizerArgs`. :class:`DynamicEmbFusedOptimizer` exposes one
``param_group`` per table whose ``"lr"`` an LR scheduler may change: like TorchRec's fused TBE
optimizers, ``step()`` and ``zero_grad()`` hand the group's learning rate to the table, so the next
backward uses it. The rows and their optimizer state live in the tables (dump them with
:func:`dynamicemb.DynamicEmbDump`), so the optimizer's own ``state`` is empty.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torchrec.optim.fused import FusedOptimizer

from dynamicemb.embedding_table import DynamicEmbeddingTable

__all__ = ["DynamicEmbFusedOptimizer"]


class DynamicEmbFusedOptimizer(FusedOptimizer):
    """Learning rates of dynamic tables, one ``param_group`` per table (``{"params": [], "lr",
    "dynamic_table": name}``); ``step`` / ``zero_grad`` apply each group's ``lr`` to its table."""

    def __init__(self, tables: Mapping[str, DynamicEmbeddingTable]) -> None:
        self._tables = dict(tables)
        groups = [
            {"params": [], "lr": table.optimizer.args.learning_rate, "dynamic_table": name}
            for name, table in self._tables.items()
        ]
        super().__init__(params={}, state={}, param_groups=groups)

    def _apply_learning_rates(self) -> None:
        for group in self.param_groups:
            optimizer = self._tables[group["dynamic_table"]].optimizer
            lr = float(group["lr"])
            if optimizer.args.learning_rate != lr:
                optimizer.args = dataclasses.replace(optimizer.args, learning_rate=lr)

    def step(self, closure: Any = None) -> None:
        """The rows were updated in backward; this only hands the groups' ``lr`` to the tables."""
        self._apply_learning_rates()

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Dynamic tables keep no gradients; this only hands the groups' ``lr`` to the tables."""
        self._apply_learning_rates()
