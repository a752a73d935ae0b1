"""Single-process behaviour of gr_parallel's setup, teardown, seeding and queries."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.distributed as dist

import gr_parallel

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No torchrun environment, no process group before; everything torn down after."""
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    yield
    gr_parallel.destroy_global_state()


def test_single_process_world_without_torchrun(single_process: None) -> None:
    gr_parallel.initialize_distributed()

    assert dist.is_initialized()
    assert dist.get_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    assert (gr_parallel.get_rank(), gr_parallel.get_world_size(), gr_parallel.get_local_rank()) == (0, 1, 0)
    value = torch.tensor([2.5], device=gr_parallel.get_device())
    dist.all_reduce(value)
    assert value.item() == 2.5


def test_model_parallel_groups_in_a_world_of_one(single_process: None) -> None:
    gr_parallel.initialize_distributed()
    gr_parallel.initialize_model_parallel()

    assert gr_parallel.model_parallel_is_initialized()
    assert gr_parallel.get_tensor_model_parallel_world_size() == 1
    assert gr_parallel.get_tensor_model_parallel_rank() == 0
    assert gr_parallel.get_data_parallel_world_size() == 1
    assert gr_parallel.get_data_parallel_rank() == 0
    assert dist.get_world_size(gr_parallel.get_tensor_model_parallel_group()) == 1
    assert dist.get_world_size(gr_parallel.get_data_parallel_group()) == 1


def test_second_initialization_is_a_no_op(single_process: None) -> None:
    gr_parallel.initialize_distributed()
    world = dist.group.WORLD
    gr_parallel.initialize_distributed()
    gr_parallel.initialize_model_parallel(1)
    data_parallel_group = gr_parallel.get_data_parallel_group()
    gr_parallel.initialize_model_parallel(1)

    assert dist.group.WORLD is world
    assert gr_parallel.get_data_parallel_group() is data_parallel_group


def test_other_backend_after_initialization_is_refused(single_process: None) -> None:
    gr_parallel.initialize_distributed(backend="gloo")
    with pytest.raises(RuntimeError, match="already initialized with backend 'gloo', not 'mpi'"):
        gr_parallel.initialize_distributed(backend="mpi")


def test_destroy_then_initialize_again(single_process: None) -> None:
    gr_parallel.initialize_distributed()
    gr_parallel.initialize_model_parallel()
    gr_parallel.destroy_global_state()

    assert not dist.is_initialized()
    assert not gr_parallel.model_parallel_is_initialized()
    assert (gr_parallel.get_rank(), gr_parallel.get_world_size()) == (0, 1)

    gr_parallel.initialize_distributed()
    gr_parallel.initialize_model_parallel()
    assert gr_parallel.get_data_parallel_world_size() == 1


def test_destroy_without_initialization_is_harmless(single_process: None) -> None:
    gr_parallel.destroy_global_state()
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_nccl_without_cuda_is_refused(single_process: None) -> None:
    with pytest.raises(RuntimeError, match="'nccl' needs CUDA"):
        gr_parallel.initialize_distributed(backend="nccl")
    assert not dist.is_initialized()


def test_incomplete_torchrun_environment_names_missing_variables(
    single_process: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set"):
        gr_parallel.initialize_distributed()


@pytest.mark.parametrize(
    ("rank", "world_size", "message"),
    [("0", "two", "WORLD_SIZE='two' is not an integer"), ("2", "2", r"RANK=2 is outside \[0, WORLD_SIZE=2\)")],
)
def test_bad_torchrun_values_are_named(
    single_process: None, monkeypatch: pytest.MonkeyPatch, rank: str, world_size: str, message: str
) -> None:
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ValueError if "integer" in message else RuntimeError, match=message):
        gr_parallel.initialize_distributed()
    assert not dist.is_initialized()


def test_model_parallel_needs_a_process_group(single_process: None) -> None:
    with pytest.raises(RuntimeError, match="call initialize_distributed"):
        gr_parallel.initialize_model_parallel()


@pytest.mark.parametrize(("size", "error"), [(2, ValueError), (0, ValueError), ("1", TypeError), (True, TypeError)])
def test_tensor_parallel_size_must_divide_world(single_process: None, size: object, error: type) -> None:
    gr_parallel.initialize_distributed()
    with pytest.raises(error, match="tensor_model_parallel_size"):
        gr_parallel.initialize_model_parallel(size)  # type: ignore[arg-type]
    assert not gr_parallel.model_parallel_is_initialized()


@pytest.mark.parametrize(
    "query",
    [
        gr_parallel.get_data_parallel_rank,
        gr_parallel.get_data_parallel_world_size,
        gr_parallel.get_data_parallel_group,
        gr_parallel.get_tensor_model_parallel_rank,
        gr_parallel.get_tensor_model_parallel_world_size,
        gr_parallel.get_tensor_model_parallel_group,
    ],
)
def test_parallel_queries_before_initialization_name_the_fix(single_process: None, query: Callable[[], object]) -> None:
    with pytest.raises(RuntimeError, match=rf"{query.__name__}\(\) needs .* initialize_model_parallel"):
        query()


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_set_random_seed_fixes_python_numpy_and_torch(single_process: None) -> None:
    gr_parallel.set_random_seed(1234)
    first = _draws()
    gr_parallel.set_random_seed(1234)
    again = _draws()
    gr_parallel.set_random_seed(1235)
    other = _draws()

    assert first == again
    for seeded, reseeded in zip(first, other):
        assert seeded != reseeded


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
def test_bad_seed_is_refused(seed: object) -> None:
    with pytest.raises(ValueError, match="seed must be an int"):
        gr_parallel.set_random_seed(seed)  # type: ignore[arg-type]


@pytest.mark.gpu
def test_set_random_seed_seeds_megatron_cuda_rng_tracker(single_process: None) -> None:
    from megatron.core import tensor_parallel

    gr_parallel.initialize_distributed()
    gr_parallel.initialize_model_parallel()
    gr_parallel.set_random_seed(1234)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        first = torch.rand(4, device="cuda")
    gr_parallel.set_random_seed(1234)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        again = torch.rand(4, device="cuda")
    default_stream_draw = torch.rand(4, device="cuda")

    assert torch.equal(first, again)
    assert not torch.equal(first, default_stream_draw)
