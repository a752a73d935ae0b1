"""Data parallelism of the dense part, in place: DDP over the data-parallel group.

:func:`data_parallel_dense` applies PyTorch's DDP to a module without wrapping it (PyTorch's
composable ``replicate``, which runs a ``DistributedDataParallel`` over the module's own
parameters through forward hooks): state-dict keys, attributes and ``isinstance`` stay those of
the module. Gradients are averaged over the data-parallel group with DDP's buckets, overlapped
with the backward. Parameters of sharded embedding collections (TorchRec ``ShardedModule``s) are
left out; data-parallel tables, being ordinary parameters, are averaged with the dense ones.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.distributed as dist
from torch import nn
from torch.distributed._composable.contract import _get_registry
from torch.distributed._composable.replicate import replicate

from gr_parallel.sharding import find_sharded_modules
from gr_parallel.state import get_data_parallel_group, model_parallel_is_initialized

__all__ = ["data_parallel_dense", "dense_parameters", "is_data_parallel_dense"]


def dense_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of ``module`` outside sharded collections, by name (what DDP synchronizes and
    what a dense optimizer should train)."""
    sharded = {id(p) for child in find_sharded_modules(module).values() for p in child.parameters()}
    return {name: p for name, p in module.named_parameters() if id(p) not in sharded}


def is_data_parallel_dense(module: nn.Module) -> bool:
    """Whether :func:`data_parallel_dense` was applied to ``module``."""
    registry = _get_registry(module)
    return registry is not None and "replicate" in registry


def data_parallel_dense(
    module: nn.Module,
    *,
    group: dist.ProcessGroup | None = None,
    ignored_modules: Iterable[nn.Module] = (),
    find_unused_parameters: bool = False,
    bucket_cap_mb: float = 25.0,
) -> nn.Module:
    """Make ``module``'s dense parameters data-parallel over ``group``, in place; returns ``module``.

    group: default :func:`gr_parallel.get_data_parallel_group` (the world when tensor parallelism
        is 1, or when Megatron's parallel state is not initialized).
    ignored_modules: further modules whose parameters are not synchronized (sharded collections
        are always left out).
    find_unused_parameters: as DDP's; set it when some dense parameters get no gradient in a step.

    On the first forward DDP broadcasts the parameters of group rank 0 (replicas start equal);
    each backward then averages the gradients over the group. A one-rank group or a module
    without dense parameters is left unchanged. Call after the embedding collections are sharded.
    """
    if not dist.is_initialized():
        raise RuntimeError("data_parallel_dense() needs a process group: call gr_parallel.initialize_distributed()")
    if group is None:
        group = get_data_parallel_group() if model_parallel_is_initialized() else dist.GroupMember.WORLD
    if dist.get_world_size(group) == 1 or not dense_parameters(module):
        return module
    if is_data_parallel_dense(module):
        raise RuntimeError(f"data_parallel_dense() was already applied to this {type(module).__name__}")
    ignored = list(find_sharded_modules(module).values()) + list(ignored_modules)
    return replicate(
        module,
        ignored_modules=ignored,
        process_group=group,
        find_unused_parameters=find_unused_parameters,
        bucket_cap_mb=bucket_cap_mb,
        broadcast_buffers=False,
        gradient_as_bucket_view=True,
    )
