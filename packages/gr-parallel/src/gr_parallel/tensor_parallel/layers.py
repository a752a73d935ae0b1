"""Megatron-core's column- and row-parallel linear layers, built from a full `nn.Linear` and returning one tensor.

`from_linear` keeps this rank's slice of an initialized full layer, so a tensor-parallel model starts from exactly
the weights of the one-rank model built with the same seed. The state dict has the keys of an `nn.Linear`
(`weight`, `bias`; no Megatron `_extra_state`), with this rank's shapes. Weights (and the column-parallel bias)
carry Megatron's attributes `tensor_model_parallel`, `partition_dim` and `partition_stride`.

Forward runs Megatron's layer (asynchronous input-gradient all-reduce overlapped with the weight gradient)
wherever it can (see `megatron_can_run`); under CPU autocast it runs the same math as `F.linear` between
`copy_to` / `reduce_from` mappings.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from gr_parallel._megatron import ModelParallelConfig
from gr_parallel._megatron import tensor_parallel as megatron_tp
from gr_parallel.state import get_tensor_model_parallel_group
from gr_parallel.tensor_parallel.mappings import (
    copy_to_tensor_parallel_region,
    megatron_can_run,
    reduce_from_tensor_parallel_region,
)

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "shard_of"]


def shard_of(tensor: Tensor, dim: int, rank: int, size: int, stride: int = 1) -> Tensor:
    """This rank's part of `tensor` along `dim`, in Megatron's strided layout.

    `tensor` is cut into `stride` equal chunks along `dim` and each chunk into `size` blocks; the rank keeps block
    `rank` of every chunk, chunks in order. With `stride=1` that is the rank's contiguous `1/size`; with e.g. the
    rows of a fused `[u; v; q; k]` projection and `stride=4`, the rank gets its heads' u, v, q and k rows.
    """
    if tensor.shape[dim] % (stride * size):
        raise ValueError(
            f"dimension {dim} of size {tensor.shape[dim]} does not split into {stride} chunks of {size} blocks"
        )
    blocks = tensor.chunk(stride * size, dim=dim)
    return torch.cat(blocks[rank::size], dim=dim)


def _config(size: int, dtype: torch.dtype) -> ModelParallelConfig:
    # Parameters are allocated on the CPU like an nn.Linear's and filled from the full layer; callers move the
    # model to its device afterwards.
    return ModelParallelConfig(
        tensor_model_parallel_size=size,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=dtype,
    )


def _not_initialized(weight: Tensor) -> None:
    """Megatron's `init_method`; unused because `perform_initialization=False` and `from_linear` copies weights."""


def _copy_in(destination: nn.Parameter, source: Tensor) -> None:
    with torch.no_grad():
        destination.copy_(source)


def _keep_plain_state_dict(layer: nn.Module) -> None:
    # Megatron registers a load-state-dict pre-hook that adds `_extra_state`; the classes below drop extra state,
    # so the hook would only make `load_state_dict(strict=True)` fail on an unexpected key.
    layer._load_state_dict_pre_hooks.clear()


class ColumnParallelLinear(megatron_tp.ColumnParallelLinear):
    """`y_local [N, out / size] = x [N, in] @ W_local^T + b_local`: output features split over the TP group.

    The input is the same on every rank; its gradient is all-reduced over the group in backward.
    """

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, stride: int = 1, group: dist.ProcessGroup | None = None
    ) -> ColumnParallelLinear:
        """This rank's output rows of `linear` (see `shard_of` for `stride`), on `linear`'s device."""
        group = get_tensor_model_parallel_group() if group is None else group
        rank, size = group.rank(), group.size()
        layer = cls(
            linear.in_features,
            linear.out_features,
            config=_config(size, linear.weight.dtype),
            init_method=_not_initialized,
            bias=linear.bias is not None,
            gather_output=False,
            stride=stride,
            tp_group=group,
        )
        _keep_plain_state_dict(layer)
        _copy_in(layer.weight, shard_of(linear.weight, 0, rank, size, stride))
        megatron_tp.set_tensor_model_parallel_attributes(layer.weight, True, 0, stride)
        if linear.bias is not None:
            _copy_in(layer.bias, shard_of(linear.bias, 0, rank, size, stride))
        return layer.to(linear.weight.device)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """`x [N, in]` -> `[N, out / size]`."""
        if megatron_can_run(x):
            return super().forward(x)[0]
        return F.linear(copy_to_tensor_parallel_region(x, self.tp_group), self.weight, self.bias)


class RowParallelLinear(megatron_tp.RowParallelLinear):
    """`y [N, out] = sum over ranks of x_local [N, in / size] @ W_local^T, + b`: input features split over the TP
    group, the output all-reduced (same on every rank). The bias is replicated on every rank."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group: dist.ProcessGroup | None = None) -> RowParallelLinear:
        """This rank's input columns of `linear` (contiguous `1/size`), on `linear`'s device."""
        group = get_tensor_model_parallel_group() if group is None else group
        rank, size = group.rank(), group.size()
        layer = cls(
            linear.in_features,
            linear.out_features,
            config=_config(size, linear.weight.dtype),
            init_method=_not_initialized,
            bias=linear.bias is not None,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=group,
        )
        _keep_plain_state_dict(layer)
        _copy_in(layer.weight, shard_of(linear.weight, 1, rank, size))
        megatron_tp.set_tensor_model_parallel_attributes(layer.weight, True, 1, 1)
        if linear.bias is not None:
            _copy_in(layer.bias, linear.bias)
        return layer.to(linear.weight.device)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """`x [N, in / size]` (this rank's features) -> `[N, out]`."""
        if megatron_can_run(x):
            return super().forward(x)[0]
        y = reduce_from_tensor_parallel_region(F.linear(x, self.weight), self.tp_group)
        return y + self.bias if self.bias is not None else y
