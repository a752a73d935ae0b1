"""Tensor-parallel parameters in a checkpoint: stored whole, by their global shape.

A parameter split over a tensor-parallel group carries Megatron-core's attributes ``tensor_model_parallel``
(True), ``partition_dim`` and ``partition_stride``: the full tensor is cut along ``partition_dim`` into
``stride`` equal chunks, each chunk into ``size`` blocks, and rank ``r`` of the group holds block ``r`` of every
chunk, chunks in order (``stride`` 1: its contiguous ``1/size``; e.g. a fused ``[u; v; q; k]`` projection split
by heads has stride 4). On save, every such parameter and each optimizer-state tensor of its shape is
all-gathered over the group and reassembled into the full tensor, the tensor a one-rank model holds under the
same name; the data-parallel and tensor-parallel copies are then identical and DCP writes each once. On load the
full tensor is read and every rank keeps its part, so a checkpoint written at one tensor-parallel size loads at
any other (1 included) that the model can be built with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["TensorParallelLayout", "tensor_parallel_layouts", "to_global", "to_local"]


@dataclass(frozen=True)
class TensorParallelLayout:
    """How one parameter is split: along ``dim`` in ``stride`` chunks over ``group`` (this rank: ``rank``)."""

    dim: int
    stride: int
    group: dist.ProcessGroup
    rank: int
    size: int
    local_shape: tuple[int, ...]

    @property
    def global_shape(self) -> tuple[int, ...]:
        shape = list(self.local_shape)
        shape[self.dim] *= self.size
        return tuple(shape)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The full tensor (``global_shape``) from every rank's ``local`` part (collective over ``group``)."""
        pieces = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(pieces, local.detach().contiguous(), group=self.group)
        chunks = [piece.chunk(self.stride, dim=self.dim) for piece in pieces]
        return torch.cat([chunks[r][j] for j in range(self.stride) for r in range(self.size)], dim=self.dim)

    def local_part(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part (``local_shape``) of the full tensor."""
        blocks = full.chunk(self.stride * self.size, dim=self.dim)
        return torch.cat(blocks[self.rank :: self.size], dim=self.dim)


def _megatron_tensor_parallel_group() -> dist.ProcessGroup | None:
    try:
        from megatron.core import parallel_state
    except ImportError:
        return None
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group()


def _group_of(owner: nn.Module, name: str) -> dist.ProcessGroup:
    # Megatron-core's linear layers keep theirs as `tp_group`, gr-parallel's split LayerNorm as `group`
    candidates = (getattr(owner, "tp_group", None), getattr(owner, "group", None))
    group = next((g for g in candidates if isinstance(g, dist.ProcessGroup)), None)
    if group is None:
        group = _megatron_tensor_parallel_group()
    if group is None:
        raise RuntimeError(
            f"parameter {name!r} is split over a tensor-parallel group (Megatron attribute tensor_model_parallel), "
            "but neither its module (tp_group) nor Megatron-core's parallel state names that group: initialize the "
            "model-parallel state (gr_parallel.initialize_model_parallel) before saving or loading"
        )
    return group


def tensor_parallel_layouts(module: nn.Module) -> dict[str, TensorParallelLayout]:
    """``{parameter FQN: layout}`` of the parameters of ``module`` split over a tensor-parallel group of more
    than one rank (FQNs as in ``module.named_parameters()``, which DCP's state dicts use)."""
    layouts: dict[str, TensorParallelLayout] = {}
    for owner_name, owner in module.named_modules():
        for param_name, param in owner.named_parameters(recurse=False):
            if not getattr(param, "tensor_model_parallel", False):
                continue
            name = f"{owner_name}.{param_name}" if owner_name else param_name
            group = _group_of(owner, name)
            size = dist.get_world_size(group)
            if size > 1:
                layouts[name] = TensorParallelLayout(
                    dim=int(param.partition_dim),
                    stride=int(getattr(param, "partition_stride", 1)),
                    group=group,
                    rank=dist.get_rank(group),
                    size=size,
                    local_shape=tuple(param.shape),
                )
    return layouts


def _convert(state: dict[str, Any], layouts: Mapping[str, TensorParallelLayout], *, gather: bool) -> None:
    optimizer_state = state.get("optimizer", {}).get("state", {})
    for name in sorted(layouts):
        layout = layouts[name]
        convert = layout.gather if gather else layout.local_part
        from_shape = layout.local_shape if gather else layout.global_shape
        if name in state["model"]:
            state["model"][name] = convert(state["model"][name])
        entry = optimizer_state.get(name)
        if isinstance(entry, dict):
            # a new dict: DCP's optimizer state dict shares its per-parameter dicts with the optimizer
            optimizer_state[name] = {
                key: convert(value) if isinstance(value, torch.Tensor) and tuple(value.shape) == from_shape else value
                for key, value in sorted(entry.items())
            }


def to_global(state: dict[str, Any], layouts: Mapping[str, TensorParallelLayout]) -> None:
    """Replace, in a ``{"model": ..., "optimizer": ...}`` state, every split parameter and each of its
    optimizer-state tensors of the parameter's shape by the full tensor (collective; same order on every rank).
    The model and optimizer themselves are not changed."""
    _convert(state, layouts, gather=True)


def to_local(state: dict[str, Any], layouts: Mapping[str, TensorParallelLayout]) -> None:
    """The inverse of :func:`to_global` on a loaded state: every full tensor becomes this rank's part."""
    _convert(state, layouts, gather=False)
