"""Tensor parallelism: mappings, Megatron-core linear layers built from full ones, a LayerNorm over split
features, per-rank random streams, and an embedding lookup shared by a tensor-parallel group."""

from gr_parallel.tensor_parallel.embedding import lookup_split_over_tensor_parallel, sample_split
from gr_parallel.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, shard_of
from gr_parallel.tensor_parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    gather_rows_from_tensor_parallel_region,
    megatron_can_run,
    reduce_from_tensor_parallel_region,
    scatter_to_tensor_parallel_region,
    sum_over_tensor_parallel_region,
)
from gr_parallel.tensor_parallel.norm import TensorParallelLayerNorm
from gr_parallel.tensor_parallel.random import (
    fork_tensor_parallel_rng,
    seed_tensor_parallel_cpu_rng,
    set_tensor_parallel_rng_state,
    tensor_parallel_rng_state,
)

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "TensorParallelLayerNorm",
    "copy_to_tensor_parallel_region",
    "fork_tensor_parallel_rng",
    "gather_from_tensor_parallel_region",
    "gather_rows_from_tensor_parallel_region",
    "lookup_split_over_tensor_parallel",
    "megatron_can_run",
    "reduce_from_tensor_parallel_region",
    "sample_split",
    "scatter_to_tensor_parallel_region",
    "seed_tensor_parallel_cpu_rng",
    "set_tensor_parallel_rng_state",
    "shard_of",
    "sum_over_tensor_parallel_region",
    "tensor_parallel_rng_state",
]
