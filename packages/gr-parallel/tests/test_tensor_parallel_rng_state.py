"""The tensor-parallel CPU stream's state can be saved and restored (for checkpoints), in one process."""

from __future__ import annotations

import torch

from gr_parallel.tensor_parallel import (
    fork_tensor_parallel_rng,
    seed_tensor_parallel_cpu_rng,
    set_tensor_parallel_rng_state,
    tensor_parallel_rng_state,
)

CPU = torch.device("cpu")


def _draw() -> torch.Tensor:
    with fork_tensor_parallel_rng(CPU):
        return torch.rand(4)


def test_restored_stream_continues_where_it_was_saved() -> None:
    seed_tensor_parallel_cpu_rng(11)
    _draw()
    saved = tensor_parallel_rng_state(CPU)
    expected = torch.stack([_draw(), _draw()])
    assert not torch.equal(expected[0], expected[1])
    seed_tensor_parallel_cpu_rng(99)  # a fresh process seeds from the config before it resumes
    set_tensor_parallel_rng_state(saved, CPU)
    assert torch.equal(torch.stack([_draw(), _draw()]), expected)


def test_state_before_the_first_fork_is_the_seeded_one() -> None:
    seed_tensor_parallel_cpu_rng(5)
    saved = tensor_parallel_rng_state(CPU)
    first = _draw()
    seed_tensor_parallel_cpu_rng(6)
    set_tensor_parallel_rng_state(saved, CPU)
    assert torch.equal(_draw(), first)
