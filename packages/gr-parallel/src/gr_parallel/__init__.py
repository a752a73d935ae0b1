"""Hybrid sparse/dense parallelism for generative recommenders.

Process-group setup (:func:`initialize_distributed`), Megatron-core tensor/data-parallel groups
(:func:`initialize_model_parallel`), seeding (:func:`set_random_seed`), teardown
(:func:`destroy_global_state`) and typed queries of ranks, sizes and groups.

Distributing a model: :func:`distribute` (one call), built from :func:`shard_embedding_modules`
(embedding tables through TorchRec's ``DistributedModelParallel`` with dynamicemb's planner and
sharders), :func:`data_parallel_dense` (DDP over the data-parallel group, in place) and
:func:`build_optimizer` (dense + fused sparse optimizers in one TorchRec ``CombinedOptimizer``).

Training: :func:`make_train_pipeline` (``none`` or ``overlap``: device copy and sparse input
all-to-all of the next batches overlapped with the current compute, see :mod:`gr_parallel.pipeline`)
and :class:`BalancedBatchSampler` (global batches split across data-parallel ranks by attention cost,
see :mod:`gr_parallel.balance`).

Tensor parallelism (:mod:`gr_parallel.tensor_parallel`): Megatron-core column/row-parallel layers, mappings,
a LayerNorm over split features and :func:`lookup_split_over_tensor_parallel` (embeddings looked up once per
tensor-parallel group); :func:`clip_grad_norm_` clips by the norm of the whole tensor-parallel model.
"""

from gr_parallel.balance import BalancedBatchSampler, partition_by_cost, sequence_cost
from gr_parallel.consistency import check_same_across_ranks, stable_hash
from gr_parallel.constraints import (
    constraints_by_child_name,
    data_parallel_constraint,
    model_parallel_constraint,
    sharded_embedding_constraints,
)
from gr_parallel.dense_parallel import data_parallel_dense, dense_parameters, is_data_parallel_dense
from gr_parallel.distribute import DistributedModel, distribute
from gr_parallel.grads import clip_grad_norm_, grad_norm
from gr_parallel.initialize import (
    DEFAULT_TIMEOUT,
    destroy_global_state,
    hold_process_groups_for,
    initialize_distributed,
    initialize_model_parallel,
    set_random_seed,
)
from gr_parallel.optimizers import DenseOptimizerFactory, build_optimizer, fused_optimizers
from gr_parallel.pipeline import (
    OverlapTrainPipeline,
    TrainPipeline,
    make_train_pipeline,
    sparse_inputs_from_attribute,
)
from gr_parallel.sharding import EmbeddingSharding, ShardingOptions, find_sharded_modules, shard_embedding_modules
from gr_parallel.state import (
    get_data_parallel_group,
    get_data_parallel_rank,
    get_data_parallel_world_size,
    get_device,
    get_local_rank,
    get_rank,
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    get_world_size,
    model_parallel_is_initialized,
)
from gr_parallel.tensor_parallel import lookup_split_over_tensor_parallel

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TIMEOUT",
    "BalancedBatchSampler",
    "DenseOptimizerFactory",
    "DistributedModel",
    "EmbeddingSharding",
    "OverlapTrainPipeline",
    "ShardingOptions",
    "TrainPipeline",
    "__version__",
    "build_optimizer",
    "check_same_across_ranks",
    "clip_grad_norm_",
    "constraints_by_child_name",
    "data_parallel_constraint",
    "data_parallel_dense",
    "dense_parameters",
    "destroy_global_state",
    "distribute",
    "find_sharded_modules",
    "fused_optimizers",
    "get_data_parallel_group",
    "get_data_parallel_rank",
    "get_data_parallel_world_size",
    "get_device",
    "get_local_rank",
    "get_rank",
    "get_tensor_model_parallel_group",
    "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_world_size",
    "get_world_size",
    "grad_norm",
    "hold_process_groups_for",
    "initialize_distributed",
    "initialize_model_parallel",
    "is_data_parallel_dense",
    "lookup_split_over_tensor_parallel",
    "make_train_pipeline",
    "model_parallel_constraint",
    "model_parallel_is_initialized",
    "partition_by_cost",
    "sequence_cost",
    "set_random_seed",
    "shard_embedding_modules",
    "sharded_embedding_constraints",
    "sparse_inputs_from_attribute",
    "stable_hash",
]
