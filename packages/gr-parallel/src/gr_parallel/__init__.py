"""Hybrid sparse/dense parallelism for generative recommenders.

Process-group setup (:func:`initialize_distributed`), Megatron-core tensor/data-parallel groups
(:func:`initialize_model_parallel`), seeding (:func:`set_random_seed`), teardown
(:func:`destroy_global_state`) and typed queries of ranks, sizes and groups.
"""

from gr_parallel.initialize import (
    DEFAULT_TIMEOUT,
    destroy_global_state,
    hold_process_groups_for,
    initialize_distributed,
    initialize_model_parallel,
    set_random_seed,
)
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

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TIMEOUT",
    "__version__",
    "destroy_global_state",
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
    "hold_process_groups_for",
    "initialize_distributed",
    "initialize_model_parallel",
    "model_parallel_is_initialized",
    "set_random_seed",
]
