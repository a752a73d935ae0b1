"""The processes of a run: gr_parallel's initialization, this rank's device and data-parallel position, and the
sums across data-parallel ranks that the loop needs for its records."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

import gr_parallel
from gr_models.trainer.config import RunConfig

__all__ = ["RunWorld", "initialize_run_world"]


@dataclass(frozen=True)
class RunWorld:
    """Where this process stands in the run.

    `rank` / `world_size` are global; `dp_rank` / `dp_size` its data-parallel position (ranks of one
    tensor-parallel group share it and read the same users); `dp_group` is None in a single-process run.
    `owns_process_group` is True when `initialize_run_world` created the process group (the CLI then tears it down).
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: dist.ProcessGroup | None = None
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the one process that writes logs, records and the progress bar."""
        return self.rank == 0

    def mean_over_global_batch(self, losses: torch.Tensor) -> torch.Tensor:
        """The training loss of this rank's `losses` (any shape): their sum over the element count of every
        data-parallel rank's losses, times the data-parallel size. Data-parallel gradients are averaged over the
        ranks (and sharded tables' gradients divided alike), so the gradients are those of the mean over the whole
        global batch, whatever each rank's share of it. `losses.mean()` in one process (one collective else)."""
        if self.dp_group is None or self.dp_size == 1:
            return losses.mean()
        count = torch.tensor([losses.numel()], dtype=torch.float32, device=losses.device)
        dist.all_reduce(count, group=self.dp_group)
        return losses.sum() * (self.dp_size / count[0])

    def sum_over_data_parallel(self, values: Sequence[float]) -> list[float]:
        """Each of `values` summed over the data-parallel ranks (collective over them; a copy in one process)."""
        if self.dp_group is None or self.dp_size == 1:
            return [float(v) for v in values]
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, group=self.dp_group)
        return tensor.tolist()


def _launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def _device(name: str, world_size: int) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} was requested but CUDA is not available")
    if name.startswith("cuda:"):
        if world_size > 1:
            raise ValueError(
                f"device={name} in a run of {world_size} processes: each rank uses the GPU of its LOCAL_RANK; "
                "set device=cuda (or auto)"
            )
        torch.cuda.set_device(torch.device(name))
    return gr_parallel.get_device()


def _check_tensor_parallel_size(config: RunConfig) -> None:
    """The model splits its attention heads over the tensor-parallel ranks: the size must divide their number."""
    size, heads = config.parallel.tensor_model_parallel_size, config.hstu.num_attention_heads
    if size > 1 and config.model != "hstu":
        raise ValueError(
            f"parallel.tensor_model_parallel_size={size}: only the HSTU models split over tensor-parallel ranks, "
            f"model {config.model!r} does not; set it to 1"
        )
    if heads % size:
        raise ValueError(
            f"parallel.tensor_model_parallel_size={size} does not divide hstu.num_attention_heads={heads}: every "
            f"tensor-parallel rank holds whole heads; use one of {[d for d in range(1, heads + 1) if heads % d == 0]}"
        )


def initialize_run_world(config: RunConfig) -> RunWorld:
    """Initialize gr_parallel for `config` and return this rank's `RunWorld`.

    Under torchrun (or inside an already initialized process group) this creates the default process group
    (gloo for `device: cpu`, else gr_parallel's default), Megatron's tensor/data-parallel groups of
    `parallel.tensor_model_parallel_size` (which must divide `hstu.num_attention_heads`; else ValueError, in one
    process too), checks that every rank has the same config (one all-gather of its hash; RuntimeError naming the
    differing ranks), and seeds every RNG with `seed`. A plain single process only seeds.
    """
    tensor_parallel = config.parallel.tensor_model_parallel_size
    _check_tensor_parallel_size(config)
    distributed = _launched_by_torchrun() or dist.is_initialized()
    if not distributed and tensor_parallel > 1:
        raise ValueError(
            f"parallel.tensor_model_parallel_size={tensor_parallel} needs that many processes: launch with "
            f"torchrun --nproc_per_node {tensor_parallel} (or a multiple of it)"
        )
    owns_process_group = False
    if distributed:
        owns_process_group = not dist.is_initialized()
        gr_parallel.initialize_distributed(backend="gloo" if config.device == "cpu" else None)
        gr_parallel.initialize_model_parallel(tensor_parallel)
        gr_parallel.check_same_across_ranks(config.to_dict(), "the run configuration (config file and overrides)")
    gr_parallel.set_random_seed(config.seed)
    world_size = gr_parallel.get_world_size()
    device = _device(config.device, world_size)
    if not distributed:
        return RunWorld(device=device)
    return RunWorld(
        device=device,
        rank=gr_parallel.get_rank(),
        world_size=world_size,
        dp_rank=gr_parallel.get_data_parallel_rank(),
        dp_size=gr_parallel.get_data_parallel_world_size(),
        dp_group=gr_parallel.get_data_parallel_group(),
        owns_process_group=owns_process_group,
    )
