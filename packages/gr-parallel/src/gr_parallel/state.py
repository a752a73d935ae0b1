"""Typed queries of the current process group and of Megatron-core's parallel state."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from gr_parallel._megatron import parallel_state

__all__ = [
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
    "model_parallel_is_initialized",
]


def get_rank() -> int:
    """Global rank; 0 when no process group is initialized."""
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the default group; 1 when no process group is initialized."""
    return dist.get_world_size() if dist.is_initialized() else 1


def get_local_rank() -> int:
    """Rank on this host: ``LOCAL_RANK`` as set by torchrun, else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def get_device() -> torch.device:
    """The device this rank computes on: the current CUDA device when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def model_parallel_is_initialized() -> bool:
    """Whether :func:`gr_parallel.initialize_model_parallel` (or Megatron's own) has run."""
    return parallel_state.model_parallel_is_initialized()


def _require_model_parallel(query: str) -> None:
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(f"{query}() needs the model parallel state: call initialize_model_parallel() first")


def get_data_parallel_group() -> dist.ProcessGroup:
    """The data-parallel group of this rank (ranks holding the same tensor-parallel shard)."""
    _require_model_parallel("get_data_parallel_group")
    return parallel_state.get_data_parallel_group()


def get_data_parallel_rank() -> int:
    """This rank's index inside its data-parallel group."""
    _require_model_parallel("get_data_parallel_rank")
    return parallel_state.get_data_parallel_rank()


def get_data_parallel_world_size() -> int:
    """Size of the data-parallel group: ``world_size // tensor_model_parallel_size``."""
    _require_model_parallel("get_data_parallel_world_size")
    return parallel_state.get_data_parallel_world_size()


def get_tensor_model_parallel_group() -> dist.ProcessGroup:
    """The tensor-parallel group of this rank (consecutive global ranks)."""
    _require_model_parallel("get_tensor_model_parallel_group")
    return parallel_state.get_tensor_model_parallel_group()


def get_tensor_model_parallel_rank() -> int:
    """This rank's index inside its tensor-parallel group."""
    _require_model_parallel("get_tensor_model_parallel_rank")
    return parallel_state.get_tensor_model_parallel_rank()


def get_tensor_model_parallel_world_size() -> int:
    """Size of the tensor-parallel group."""
    _require_model_parallel("get_tensor_model_parallel_world_size")
    return parallel_state.get_tensor_model_parallel_world_size()
