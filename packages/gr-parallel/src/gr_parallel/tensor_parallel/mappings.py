"""Autograd mappings into and out of the tensor-parallel region, one dispatch point for every device.

Megatron-core's mappings are used wherever they run: `copy_to` and `reduce_from` on every device, the
last-dimension gather and scatter on CUDA tensors. Megatron allocates the gather's output with
`torch.cuda.current_device()`, so on CPU (gloo) the gather and scatter go through the thin autograd functions
below, which compute the same thing with `torch.distributed` collectives only. Mappings that Megatron-core does
not have (an all-reduce whose gradient is all-reduced too, and an all-gather of uneven row blocks whose gradient
is this rank's block) exist only here and run on every device.

`group` defaults to the tensor-parallel group of :func:`gr_parallel.initialize_model_parallel`. With a group of
one rank every mapping returns its input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from gr_parallel._megatron import tensor_parallel as megatron_tp
from gr_parallel.state import get_tensor_model_parallel_group

__all__ = [
    "copy_to_tensor_parallel_region",
    "gather_from_tensor_parallel_region",
    "gather_rows_from_tensor_parallel_region",
    "megatron_can_run",
    "reduce_from_tensor_parallel_region",
    "scatter_to_tensor_parallel_region",
    "sum_over_tensor_parallel_region",
]


def megatron_can_run(x: Tensor) -> bool:
    """Whether Megatron-core's CUDA-bound code may handle `x`: it is a CUDA tensor, or a CPU tensor outside CPU
    autocast (Megatron's linear autograd functions keep CUDA autocast only, so a CPU autocast forward leaves a
    low-precision gradient that their backward cannot multiply with float32 weights)."""
    return x.is_cuda or not torch.is_autocast_enabled("cpu")


def _group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return get_tensor_model_parallel_group() if group is None else group


def copy_to_tensor_parallel_region(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Identity forward; all-reduce (sum) of the gradient over the group in backward. Any shape."""
    return megatron_tp.copy_to_tensor_model_parallel_region(x, group=_group(group))


def reduce_from_tensor_parallel_region(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """All-reduce (sum) over the group forward; identity backward. Any shape."""
    return megatron_tp.reduce_from_tensor_model_parallel_region(x, group=_group(group))


def _all_gather_last_dim(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(group.size())]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return _all_gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _own_part_of_last_dim(grad, ctx.group), None


class _ScatterLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return _own_part_of_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _all_gather_last_dim(grad, ctx.group), None


def _own_part_of_last_dim(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    size = group.size()
    if x.shape[-1] % size:
        raise ValueError(f"last dimension {x.shape[-1]} does not split evenly over {size} tensor-parallel ranks")
    return x.chunk(size, dim=-1)[group.rank()].contiguous()


def gather_from_tensor_parallel_region(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """`[..., d]` on each rank -> `[..., size * d]`, blocks in rank order; backward keeps this rank's block."""
    group = _group(group)
    if group.size() == 1:
        return x
    if x.is_cuda:
        return megatron_tp.gather_from_tensor_model_parallel_region(x, group=group)
    return _GatherLastDim.apply(x, group)


def scatter_to_tensor_parallel_region(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """`[..., size * d]` (equal on every rank) -> this rank's block `[..., d]`; backward all-gathers."""
    group = _group(group)
    if group.size() == 1:
        return x
    if x.is_cuda:
        return megatron_tp.scatter_to_tensor_model_parallel_region(x, group=group)
    return _ScatterLastDim.apply(x, group)


class _SumBothWays(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        total = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total, None


def sum_over_tensor_parallel_region(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """All-reduce (sum) forward and backward: for partial sums whose total each rank feeds into its own,
    disjoint part of the model (e.g. LayerNorm statistics over a width split across ranks). Any shape."""
    group = _group(group)
    if group.size() == 1:
        return x
    return _SumBothWays.apply(x, group)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, rows: tuple[int, ...], group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        rank = group.rank()
        ctx.start, ctx.stop = sum(rows[:rank]), sum(rows[: rank + 1])
        tail = x.shape[1:]
        padded = x.new_zeros((max(rows), *tail))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, rows)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return grad[ctx.start : ctx.stop], None, None


def gather_rows_from_tensor_parallel_region(
    x: Tensor, rows: Sequence[int], group: dist.ProcessGroup | None = None
) -> Tensor:
    """Concatenate every rank's `x [rows[r], ...]` along dim 0 -> `[sum(rows), ...]`, in rank order.

    `rows` (one count per rank, the same list on every rank) may be uneven. Backward gives this rank the rows of
    the gradient that match its block, without communication: for a result that every rank consumes identically
    (replicated computation), each rank's gradient is already the full one, so summing would count it `size`
    times.
    """
    group = _group(group)
    rows = tuple(int(n) for n in rows)
    if len(rows) != group.size():
        raise ValueError(f"rows has {len(rows)} counts for a tensor-parallel group of {group.size()} ranks")
    if x.shape[0] != rows[group.rank()]:
        raise ValueError(f"rank {group.rank()} holds {x.shape[0]} rows, but rows says {rows[group.rank()]}")
    if group.size() == 1:
        return x
    return _GatherRows.apply(x, rows, group)
