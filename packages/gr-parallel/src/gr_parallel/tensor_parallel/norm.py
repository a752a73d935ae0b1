"""LayerNorm over a feature dimension split across the tensor-parallel group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gr_parallel._megatron import tensor_parallel as megatron_tp
from gr_parallel.state import get_tensor_model_parallel_group
from gr_parallel.tensor_parallel.layers import shard_of
from gr_parallel.tensor_parallel.mappings import sum_over_tensor_parallel_region

__all__ = ["TensorParallelLayerNorm"]


class TensorParallelLayerNorm(nn.Module):
    """`nn.LayerNorm` over the full width `size * d` of features that each rank holds `d` of.

    Each rank computes the mean and sum of squared deviations of its block in float32; one all-reduce of
    `[N, 3]` statistics combines them (Chan et al.'s parallel variance), and its backward all-reduces their
    gradient, so the result and gradients equal a LayerNorm of the gathered features. `weight` and `bias` hold
    this rank's `d` entries (Megatron attributes `tensor_model_parallel`, `partition_dim=0`). The output is
    float32, as `nn.LayerNorm` under autocast.
    """

    def __init__(self, full_width: int, eps: float = 1e-5, *, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.group = get_tensor_model_parallel_group() if group is None else group
        size = self.group.size()
        if full_width % size:
            raise ValueError(f"LayerNorm width {full_width} does not split over {size} tensor-parallel ranks")
        self.full_width, self.local_width, self.eps = full_width, full_width // size, eps
        self.weight = nn.Parameter(torch.ones(self.local_width))
        self.bias = nn.Parameter(torch.zeros(self.local_width))
        for param in (self.weight, self.bias):
            megatron_tp.set_tensor_model_parallel_attributes(param, True, 0, 1)

    @classmethod
    def from_layer_norm(cls, norm: nn.LayerNorm, *, group: dist.ProcessGroup | None = None) -> TensorParallelLayerNorm:
        """This rank's block of an affine `nn.LayerNorm` over one dimension, on `norm`'s device."""
        if len(norm.normalized_shape) != 1 or norm.weight is None or norm.bias is None:
            raise ValueError("from_layer_norm needs an affine LayerNorm (weight and bias) over one dimension")
        layer = cls(norm.normalized_shape[0], norm.eps, group=group)
        rank, size = layer.group.rank(), layer.group.size()
        with torch.no_grad():
            layer.weight.copy_(shard_of(norm.weight, 0, rank, size))
            layer.bias.copy_(shard_of(norm.bias, 0, rank, size))
        return layer.to(norm.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        """`x [..., d]` (this rank's block of the features) -> float32 `[..., d]`."""
        if x.shape[-1] != self.local_width:
            raise ValueError(f"expected {self.local_width} features on this rank, got {x.shape[-1]}")
        x = x.float()
        size = self.group.size()
        local_mean = x.mean(dim=-1, keepdim=True)
        local_m2 = (x - local_mean).square().sum(dim=-1, keepdim=True)
        stats = torch.cat([local_mean, local_mean.square(), local_m2], dim=-1)
        total_mean, total_mean_sq, total_m2 = sum_over_tensor_parallel_region(stats, self.group).split(1, dim=-1)
        mean = total_mean / size
        m2 = total_m2 + self.local_width * (total_mean_sq - size * mean.square())
        inverse_std = torch.rsqrt(m2 / self.full_width + self.eps)
        return (x - mean) * inverse_std * self.weight.float() + self.bias.float()

    def extra_repr(self) -> str:
        return f"{self.local_width} of {self.full_width}, eps={self.eps}"
