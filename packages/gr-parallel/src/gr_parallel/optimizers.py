"""Optimizers of a distributed model: a dense optimizer beside the sharded tables' fused ones.

The sparse side is TorchRec's: every sharded collection is a ``FusedOptimizerModule`` whose
``KeyedOptimizer`` updates its rows inside the backward (dynamicemb's sharded collections expose
their dynamic tables' learning rates the same way). :func:`build_optimizer` puts the dense
optimizer and all of those into one TorchRec ``CombinedOptimizer``, whose ``param_groups`` are
the groups of every optimizer, so one ``torch.optim.lr_scheduler`` on it reaches them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper

from gr_parallel.dense_parallel import dense_parameters

__all__ = ["DenseOptimizerFactory", "build_optimizer", "fused_optimizers"]

DenseOptimizerFactory = Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]


def fused_optimizers(module: nn.Module) -> CombinedOptimizer:
    """The fused (in-backward) optimizers of every sharded collection under ``module``, keyed by
    the collection's path (as ``DistributedModelParallel.fused_optimizer`` keys them)."""
    found: list[tuple[str, KeyedOptimizer]] = []

    def visit(child: nn.Module, path: str) -> None:
        if isinstance(child, FusedOptimizerModule):
            found.append((path, child.fused_optimizer))
            return
        for name, grandchild in child.named_children():
            visit(grandchild, f"{path}.{name}" if path else name)

    visit(module, "")
    return CombinedOptimizer(found)


def build_optimizer(
    module: nn.Module,
    dense_optimizer: DenseOptimizerFactory | None,
    sparse_optimizer: KeyedOptimizer | None = None,
) -> CombinedOptimizer:
    """One optimizer for ``module``: ``dense_optimizer(params)`` over its dense parameters (those
    outside sharded collections, data-parallel tables included) under key ``"dense"``, and the
    sharded tables' fused optimizers (``sparse_optimizer``, default :func:`fused_optimizers`)
    under ``"sparse"``. ``step()`` steps the dense part (the fused ones updated in backward and
    only take their new learning rates); ``zero_grad()`` clears the dense gradients."""
    optimizers: list[tuple[str, KeyedOptimizer]] = []
    dense = dense_parameters(module)
    if dense_optimizer is not None and dense:
        optimizers.append(("dense", KeyedOptimizerWrapper(dense, dense_optimizer)))
    optimizers.append(("sparse", sparse_optimizer if sparse_optimizer is not None else fused_optimizers(module)))
    return CombinedOptimizer(optimizers)
