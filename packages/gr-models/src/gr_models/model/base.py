"""What every GR model shares: its embedding tables, its device, the split into dense and sparse parameters, and
its distribution over the processes of an initialized world when it is built inside one."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import gr_parallel
from gr_models.data.batch import Batch
from gr_models.data.schema import DatasetSchema
from gr_models.modules.embedding import ShardedEmbedding


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


class _DistributedWhenBuilt(type):
    """Metaclass of `GRModel`: once a model's whole constructor has run, it is distributed over the world."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        model = super().__call__(*args, **kwargs)
        model._distribute_over_world()
        return model


class GRModel(nn.Module, metaclass=_DistributedWhenBuilt):
    """Base of RankingGR, RetrievalGR and SASRec. Subclasses set `self.embedding` and their dense modules.

    Built inside an initialized world of N > 1 processes (`gr_parallel.initialize_distributed()`, e.g. under
    `torchrun --nproc_per_node N`), a model comes out distributed, with no further call: its model-parallel static
    tables and its dynamic tables sharded over the N ranks (`ShardedEmbedding.shard`), its dense part (data-parallel
    tables included) data-parallel over `gr_parallel.get_data_parallel_group()` (gradients averaged in backward,
    `gr_parallel.data_parallel_dense`). Every rank must build it alike (checked) and feed its own share of the
    batch; a loss averaged over that share gives the gradients of the loss averaged over the global batch. In a
    single process (or a world of one) the model stays whole.
    """

    embedding: ShardedEmbedding

    def __init__(self, device: torch.device | str | None) -> None:
        super().__init__()
        self._device = torch.device(device) if device is not None else gr_parallel.get_device()
        self.distributed_world_size = 1

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def is_distributed(self) -> bool:
        """True when the model was distributed over a world of several processes when it was built."""
        return self.distributed_world_size > 1

    def _distribute_over_world(self) -> None:
        world_size = _world_size()
        if world_size == 1:
            return
        self.embedding.shard(self._device)
        gr_parallel.data_parallel_dense(self)
        gr_parallel.hold_process_groups_for(self)
        self.distributed_world_size = world_size

    def _on_device(self, batch: Batch) -> Batch:
        if _world_size() > 1 and not self.is_distributed:
            raise RuntimeError(
                f"this {type(self).__name__} was built before the process group of {_world_size()} ranks existed, "
                "so every rank would train its own full copy: build the model after "
                "gr_parallel.initialize_distributed() (it is then sharded and data-parallel over the ranks)"
            )
        return batch if batch.features.device() == self._device else batch.to(self._device)

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        """Every trainable parameter outside the embedding tables (the dense optimizer's parameters).

        Unsharded static tables are trained by `sparse_optimizers()`, sharded ones and dynamic tables by their
        optimizer fused into the backward.
        """
        tables = {id(weight) for _, weight in self.embedding.static_parameters()}
        for module in gr_parallel.find_sharded_modules(self.embedding).values():
            tables.update(id(p) for p in module.parameters())
        return (p for p in self.parameters() if p.requires_grad and id(p) not in tables)

    def sparse_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One row-sparse optimizer per unsharded static table (sharded and dynamic tables update themselves in
        backward)."""
        return self.embedding.sparse_optimizers()

    def evaluate(
        self,
        batches: Iterable[tuple[Batch, bool]],
        schema: DatasetSchema,
        process_group: dist.ProcessGroup | None = None,
    ) -> dict[str, float]:
        """The task's metrics over `(batch, counts)` pairs of an evaluation split (call under `torch.no_grad()`).

        Every batch runs through the model (sharded lookups are collective, so every rank runs as many), but only
        those with `counts` True enter the metrics. With `process_group` the metrics combine the predictions of
        every rank of the group (each rank evaluating its share of the users). Each model class implements it
        (RankingGR: per-task classification metrics; RetrievalGR and SASRec: full-corpus ranking metrics).
        """
        raise TypeError(f"cannot evaluate a {type(self).__name__}")
