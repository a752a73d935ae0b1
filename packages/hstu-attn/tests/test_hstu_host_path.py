"""The hot path of `hstu_attn_varlen_func`: value checks once per offsets tensor, the eager autograd path equal to
the custom op's, and the launch-config fallback when tuning is off."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

import hstu_attn._validation as validation
import hstu_attn.interface as interface
from hstu_attn import hstu_attn_varlen_func, set_value_checks

HEADS, DIM, MAX_LEN = 2, 4, 5


def _inputs(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(8, HEADS, DIM, generator=generator, requires_grad=True) for _ in range(3))
    return {"q": q, "k": k, "v": v, "seq_offsets": torch.tensor([0, 3, 8]), "max_seq_len": MAX_LEN}


@pytest.fixture
def value_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Tensor]]:
    """Counts the value checks that run (each is one device-to-host read on CUDA); fresh records per test."""
    checked: list[Tensor] = []
    real = validation._check_values

    def counting(seq_offsets: Tensor, *args: object) -> None:
        checked.append(seq_offsets)
        real(seq_offsets, *args)

    monkeypatch.setattr(validation, "_check_values", counting)
    monkeypatch.setattr(validation, "_value_checks", validation._ValueChecks("new"))
    yield checked


def test_values_are_checked_once_per_offsets_tensor(value_checks: list[Tensor]) -> None:
    inputs = _inputs()
    for _ in range(3):
        hstu_attn_varlen_func(**inputs)
    assert len(value_checks) == 1
    hstu_attn_varlen_func(**{**inputs, "seq_offsets": inputs["seq_offsets"].clone()})
    assert len(value_checks) == 2


def test_an_offsets_tensor_changed_in_place_is_checked_again(value_checks: list[Tensor]) -> None:
    inputs = _inputs()
    hstu_attn_varlen_func(**inputs)
    inputs["seq_offsets"][1] = 9  # now longer than max_seq_len and past the end
    with pytest.raises(ValueError, match="seq_offsets"):
        hstu_attn_varlen_func(**inputs)
    assert len(value_checks) == 2


def test_a_smaller_max_seq_len_or_new_targets_are_checked_again(value_checks: list[Tensor]) -> None:
    inputs = _inputs()
    hstu_attn_varlen_func(**inputs)
    with pytest.raises(ValueError, match=r"max_seq_len = 4 is smaller than the longest sequence \(5\)"):
        hstu_attn_varlen_func(**{**inputs, "max_seq_len": 4})
    with pytest.raises(ValueError, match="must not exceed its sequence"):
        hstu_attn_varlen_func(**inputs, num_targets=torch.tensor([4, 0]))
    assert len(value_checks) == 3


def test_value_check_modes(value_checks: list[Tensor]) -> None:
    inputs = _inputs()
    previous = set_value_checks("always")
    try:
        hstu_attn_varlen_func(**inputs)
        hstu_attn_varlen_func(**inputs)
        assert len(value_checks) == 2
        set_value_checks("off")
        hstu_attn_varlen_func(**{**inputs, "seq_offsets": inputs["seq_offsets"].clone()})
        assert len(value_checks) == 2
        with pytest.raises(ValueError, match="value-check mode must be one of"):
            set_value_checks("sometimes")
    finally:
        set_value_checks(previous)


def test_eager_path_equals_the_custom_op() -> None:
    inputs = _inputs(seed=1)
    num_targets = torch.tensor([1, 2])
    leaves = [inputs["q"], inputs["k"], inputs["v"]]
    grad_out = torch.randn(8, HEADS, DIM)
    eager = hstu_attn_varlen_func(**inputs, num_targets=num_targets, contextual_seq_len=1)
    eager_grads = torch.autograd.grad(eager, leaves, grad_out)
    op_inputs = (*leaves, inputs["seq_offsets"], num_targets, None, None, None, None, MAX_LEN, 0.5, MAX_LEN, True, 1)
    through_op = interface._hstu_attn_forward(*op_inputs, 0, 0.301, "auto", False, False)
    op_grads = torch.autograd.grad(through_op, leaves, grad_out)
    assert torch.equal(eager, through_op)
    for a, b in zip(eager_grads, op_grads):
        assert torch.equal(a, b)


def test_untuned_launch_skips_configs_that_exceed_shared_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    configs = pytest.importorskip("hstu_attn.triton.configs")
    from triton.runtime.errors import OutOfResources

    launched: list[int] = []

    class FakeKernel:
        __name__ = "fake_kernel"

        def __getitem__(self, grid: tuple[int]):
            def launch(*args: object, BLOCK_M: int, **meta: object) -> None:
                if BLOCK_M == 128:
                    raise OutOfResources(262144, 232448, "shared memory")
                launched.append(BLOCK_M)

            return launch

    monkeypatch.setattr(configs, "INTERPRET", False)
    monkeypatch.setattr(configs, "AUTOTUNE", False)
    monkeypatch.setattr(configs, "ONLY_CANDIDATE", None)
    kernel = configs.TunedKernel(FakeKernel(), {256: [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)]})
    accumulator = torch.ones(3)
    kernel.launch(("key",), 256, lambda config: (1,), (), {}, accumulators=(accumulator,))
    assert kernel.chosen[("key",)] == configs.LaunchConfig(64, 64, 4, 2)
    assert launched == [64, 64]  # one trial launch of the first config that fits, then the launch itself
    assert torch.equal(accumulator, torch.zeros(3))  # the trial's additions are cleared
