"""Gradient norm and clipping of a model that is data- and tensor-parallel.

Where the gradients stand when these functions run (after ``backward``):

- data parallelism: :func:`gr_parallel.data_parallel_dense` (DDP) has averaged the dense gradients over the
  data-parallel group, so every data-parallel replica holds the same gradients;
- tensor parallelism: gradients of replicated parameters are complete and equal on every tensor-parallel rank
  (inputs of column-parallel layers get their gradient all-reduced, and replicated tables used by a rank's
  heads only, such as HSTU's relative bias, pass a `copy_to_tensor_parallel_region` that sums their partial
  gradients), while each sharded parameter (Megatron attribute ``tensor_model_parallel``) holds its shard's.

So the norm of the whole model's gradient is a sum over the tensor-parallel group of the sharded parameters'
terms plus the replicated parameters' terms counted on tensor-parallel rank 0 only; no data-parallel reduction is
needed (each data-parallel replica computes the same norm). Sums are in float32 whatever the gradients' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gr_parallel.state import get_tensor_model_parallel_group, model_parallel_is_initialized

__all__ = ["clip_grad_norm_", "grad_norm", "is_tensor_parallel_sharded"]


def is_tensor_parallel_sharded(param: Tensor) -> bool:
    """Whether `param` is one rank's shard of a tensor-parallel parameter (Megatron's attribute)."""
    return bool(getattr(param, "tensor_model_parallel", False))


def _grad_values(param: Tensor) -> Tensor:
    grad = param.grad
    assert grad is not None
    return grad.coalesce().values() if grad.is_sparse else grad


def _default_group() -> dist.ProcessGroup | None:
    if model_parallel_is_initialized():
        return get_tensor_model_parallel_group()
    return None


def grad_norm(
    parameters: Iterable[nn.Parameter], norm_type: float = 2.0, *, group: dist.ProcessGroup | None = None
) -> Tensor:
    """The `norm_type`-norm of the gradients of the whole model, as a float32 scalar equal on every rank.

    Args:
        parameters: this rank's parameters (those without a gradient are skipped).
        norm_type: a positive p, or `math.inf`.
        group: the tensor-parallel group (default: gr-parallel's, or none without model-parallel state).
    """
    if not norm_type > 0:
        raise ValueError(f"norm_type must be positive or inf, got {norm_type}")
    group = _default_group() if group is None else group
    tp_size = 1 if group is None else group.size()
    first_rank = group is None or group.rank() == 0
    params = list(parameters)
    device = params[0].device if params else torch.device("cpu")
    grads = [
        _grad_values(p).float() for p in params if p.grad is not None and (first_rank or is_tensor_parallel_sharded(p))
    ]
    total = torch.zeros((), dtype=torch.float32, device=device)
    if norm_type == math.inf:
        for g in grads:
            if g.numel():
                total = torch.maximum(total, g.abs().max())
        if tp_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
        return total
    for g in grads:
        total += g.abs().pow(norm_type).sum()
    if tp_size > 1:
        dist.all_reduce(total, group=group)
    return total.pow(1.0 / norm_type)


def clip_grad_norm_(
    parameters: Iterable[nn.Parameter],
    max_norm: float,
    norm_type: float = 2.0,
    *,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Scale the gradients in place so that the whole model's `grad_norm` is at most `max_norm`.

    Same rule as `torch.nn.utils.clip_grad_norm_` (coefficient `max_norm / (norm + 1e-6)`, capped at 1), applied
    with the norm over every rank, so N tensor-parallel ranks clip exactly as one process does. Returns the norm
    before clipping (float32 scalar, equal on every rank; non-finite when a gradient is).
    """
    params = [p for p in parameters if p.grad is not None]
    total = grad_norm(params, norm_type, group=group)
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for param in params:
        param.grad.mul_(coefficient.to(param.grad.dtype))  # type: ignore[union-attr]
    return total
