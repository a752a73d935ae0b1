"""``distribute(model)``: sharded embeddings, data-parallel dense part and one optimizer, in one call."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer

from gr_parallel.dense_parallel import data_parallel_dense, is_data_parallel_dense
from gr_parallel.optimizers import DenseOptimizerFactory, build_optimizer
from gr_parallel.sharding import EmbeddingSharding, ShardingOptions, shard_embedding_modules

__all__ = ["DistributedModel", "distribute"]


class _DenseDataParallel(DataParallelWrapper):
    """DMP's data-parallel step: :func:`data_parallel_dense` over the data-parallel group."""

    def __init__(self, group: dist.ProcessGroup | None, find_unused_parameters: bool) -> None:
        self._group = group
        self._find_unused_parameters = find_unused_parameters

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        module = dmp._dmp_wrapped_module
        if not is_data_parallel_dense(module):
            data_parallel_dense(module, group=self._group, find_unused_parameters=self._find_unused_parameters)


class DistributedModel(DistributedModelParallel):
    """A TorchRec ``DistributedModelParallel`` made by :func:`distribute`.

    Forward, ``module``, ``plan``, ``fused_optimizer`` and ``state_dict`` are DMP's (keys are the
    model's own). In addition:

    - ``sharding``: the :class:`~gr_parallel.EmbeddingSharding` applied to the model's collections;
    - ``optimizer``: a TorchRec ``CombinedOptimizer`` of the dense optimizer (key ``"dense"``) and
      every fused table optimizer, dynamic tables included (key ``"sparse"``); an LR scheduler on
      it reaches all of them;
    - ``dense_optimizer``: the dense part's ``KeyedOptimizer`` (``None`` without a factory).
    """

    def __init__(
        self,
        module: nn.Module,
        sharding: EmbeddingSharding,
        dense_optimizer: DenseOptimizerFactory | None,
        data_parallel_group: dist.ProcessGroup | None,
        find_unused_parameters: bool,
    ) -> None:
        super().__init__(
            module,
            env=sharding.env,
            device=sharding.device,
            plan=sharding.plan,
            sharders=sharding.sharders,
            init_data_parallel=True,
            data_parallel_wrapper=_DenseDataParallel(data_parallel_group, find_unused_parameters),
        )
        self.sharding = sharding
        self.optimizer: CombinedOptimizer = build_optimizer(self.module, dense_optimizer, self.fused_optimizer)
        self.dense_optimizer: KeyedOptimizer | None = dict(self.optimizer.optimizers).get("dense")


def distribute(
    model: nn.Module,
    *,
    sharding: ShardingOptions | None = None,
    dense_optimizer: DenseOptimizerFactory | None = None,
    data_parallel_group: dist.ProcessGroup | None = None,
    find_unused_parameters: bool = False,
    device: torch.device | None = None,
) -> DistributedModel:
    """Distribute ``model`` over the initialized world, in one call.

    1. Its embedding collections are sharded in place by :func:`shard_embedding_modules` with
       ``sharding`` (model-parallel static tables by TorchRec, dynamic tables by dynamicemb,
       data-parallel tables left replicated); collections sharded before are kept.
    2. Its dense parameters (data-parallel tables included) become data-parallel over
       ``data_parallel_group`` (default :func:`gr_parallel.get_data_parallel_group`) by
       :func:`data_parallel_dense`, unless that was applied already.
    3. ``dense_optimizer(params)`` (e.g. ``lambda ps: torch.optim.Adam(ps, lr=1e-3)``) is built over
       the dense parameters and combined with the tables' fused optimizers in ``.optimizer``.

    Every rank must call it with the same model and options (checked). The model's forward takes
    this rank's share of the batch; a loss averaged over it gives, after the backward, the
    gradients of the loss averaged over the global batch (dense gradients averaged by DDP, table
    gradients divided by the world size under TorchRec's gradient division).
    """
    sharding_result = shard_embedding_modules(model, sharding, device=device)
    return DistributedModel(model, sharding_result, dense_optimizer, data_parallel_group, find_unused_parameters)
