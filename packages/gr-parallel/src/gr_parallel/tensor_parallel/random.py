"""Random numbers that differ across tensor-parallel ranks (dropout inside a split layer).

CUDA tensors use Megatron-core's CUDA RNG tracker (seeded by :func:`gr_parallel.set_random_seed` with
`seed + 2718 + tp_rank`). For CPU tensors this module keeps one CPU generator state per process, seeded the same
way, and swaps it in as the default CPU generator for the duration of the fork.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from gr_parallel._megatron import tensor_parallel as megatron_tp
from gr_parallel.state import get_tensor_model_parallel_rank, model_parallel_is_initialized

__all__ = [
    "fork_tensor_parallel_rng",
    "seed_tensor_parallel_cpu_rng",
    "set_tensor_parallel_rng_state",
    "tensor_parallel_rng_state",
]

TENSOR_PARALLEL_SEED_OFFSET = 2718  # Megatron-core's offset, so CPU and CUDA streams are seeded alike

_cpu_seed: int | None = None
_cpu_state: torch.Tensor | None = None


def seed_tensor_parallel_cpu_rng(seed: int) -> None:
    """Seed the CPU stream: its first fork starts from `seed + 2718 + tp_rank` (the TP rank at that time)."""
    global _cpu_seed, _cpu_state
    _cpu_seed, _cpu_state = seed, None


def _initial_cpu_state() -> torch.Tensor:
    if _cpu_seed is None:
        raise RuntimeError("the tensor-parallel CPU RNG is not seeded: call gr_parallel.set_random_seed(seed) first")
    tp_rank = get_tensor_model_parallel_rank() if model_parallel_is_initialized() else 0
    generator = torch.Generator().manual_seed(_cpu_seed + TENSOR_PARALLEL_SEED_OFFSET + tp_rank)
    return generator.get_state()


@contextmanager
def fork_tensor_parallel_rng(device: torch.device) -> Iterator[None]:
    """Inside the block, random ops on `device` draw from this tensor-parallel rank's own stream."""
    if device.type == "cuda":
        with megatron_tp.get_cuda_rng_tracker().fork():
            yield
        return
    if device.type != "cpu":
        raise NotImplementedError(f"no tensor-parallel RNG stream for device type {device.type!r}")
    global _cpu_state
    own_state = _cpu_state if _cpu_state is not None else _initial_cpu_state()
    default_state = torch.get_rng_state()
    torch.set_rng_state(own_state)
    try:
        yield
    finally:
        _cpu_state = torch.get_rng_state()
        torch.set_rng_state(default_state)


def tensor_parallel_rng_state(device: torch.device) -> dict[str, object]:
    """This rank's tensor-parallel stream, to checkpoint: the CPU generator state (`None` before seeding) and, for
    a CUDA `device`, Megatron's CUDA RNG tracker states."""
    cpu = _cpu_state if _cpu_state is not None else (_initial_cpu_state() if _cpu_seed is not None else None)
    state: dict[str, object] = {"cpu": cpu}
    if device.type == "cuda":
        state["cuda"] = megatron_tp.get_cuda_rng_tracker().get_states()
    return state


def set_tensor_parallel_rng_state(state: dict[str, object], device: torch.device) -> None:
    """Continue the stream from what `tensor_parallel_rng_state` returned."""
    global _cpu_state
    if state.get("cpu") is not None:
        _cpu_state = state["cpu"]  # type: ignore[assignment]
    if device.type == "cuda" and "cuda" in state:
        megatron_tp.get_cuda_rng_tracker().set_states(state["cuda"])
