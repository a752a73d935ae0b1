"""Autograd gradients of the reference (q, k, v, rab, bias tables) against finite differences in float64."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from hstu_attn import RelativeBias, hstu_attn_reference
from hstu_attn.reference import hstu_attn_reference_backward

LENGTHS = [4, 0, 1, 3]
TARGETS = [1, 0, 1, 3]
MAX_LEN = 4
OFFSETS = torch.tensor([0, 4, 4, 5, 8])

OPTION_SETS = [
    {"causal": True},
    {"causal": False},
    {"causal": True, "targets": True},
    {"causal": False, "targets": True},
    {"causal": True, "contextual": 2},
    {"causal": True, "window": 1},
    {"causal": True, "targets": True, "contextual": 1, "window": 1},
    {"causal": False, "targets": True, "contextual": 1, "window": 1},
]
FULLY_CHECKED = OPTION_SETS[6]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_reference_gradients_match_finite_differences(options: dict) -> None:
    generator = torch.Generator().manual_seed(0)
    heads, dim_qk, dim_v, total = 2, 3, 2, int(OFFSETS[-1])

    def leaf(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(True)

    q, k, v = leaf(total, heads, dim_qk), leaf(total, heads, dim_qk), leaf(total, heads, dim_v)
    rab = leaf(len(LENGTHS), heads, MAX_LEN, MAX_LEN)
    position_weights, time_weights = leaf(heads, 5), leaf(1, 4)
    timestamps = torch.randint(0, 60, (total,), generator=generator)
    num_targets = torch.tensor(TARGETS) if options.get("targets") else None

    def attention(q: Tensor, k: Tensor, v: Tensor, rab: Tensor, position: Tensor, time: Tensor) -> Tensor:
        bias = RelativeBias(position, time, timestamps, time_bucket_divisor=1.0)
        return hstu_attn_reference(
            q, k, v, OFFSETS, MAX_LEN, alpha=0.8, causal=options["causal"], num_targets=num_targets,
            contextual_seq_len=options.get("contextual", 0), max_attn_len=options.get("window", 0),
            rab=rab, relative_bias=bias,
        )  # fmt: skip

    # Full Jacobians for one combined mask; random projections (fast mode) keep the other sets quick.
    fast_mode = options != FULLY_CHECKED
    assert torch.autograd.gradcheck(attention, (q, k, v, rab, position_weights, time_weights), fast_mode=fast_mode)


def test_shared_rab_gradient_sums_over_heads() -> None:
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(5, 3, 2, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rab = torch.randn(2, 1, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 3, 5], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda q, k, v, r: hstu_attn_reference(q, k, v, offsets, 3, rab=r), (q, k, v, rab))


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize(("rab_heads", "position_rows", "time_rows"), [(1, 2, 1), (2, 1, 2)])
def test_explicit_backward_matches_autograd(options: dict, rab_heads: int, position_rows: int, time_rows: int) -> None:
    generator = torch.Generator().manual_seed(2)
    heads, total = 2, int(OFFSETS[-1])

    def leaf(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(True)

    q, k, v = leaf(total, heads, 3), leaf(total, heads, 3), leaf(total, heads, 5)
    rab = leaf(len(LENGTHS), rab_heads, MAX_LEN, MAX_LEN)
    bias = RelativeBias(leaf(position_rows, 3), leaf(time_rows, 4), torch.randint(0, 60, (total,), generator=generator))
    arguments = {
        "alpha": 0.8,
        "causal": options["causal"],
        "num_targets": torch.tensor(TARGETS) if options.get("targets") else None,
        "contextual_seq_len": options.get("contextual", 0),
        "max_attn_len": options.get("window", 0),
        "scaling_seqlen": 3,
        "rab": rab,
        "relative_bias": bias,
    }
    grad_out = torch.randn(total, heads, 5, generator=generator, dtype=torch.float64)
    out = hstu_attn_reference(q, k, v, OFFSETS, MAX_LEN, **arguments)
    expected = torch.autograd.grad(out, (q, k, v, rab, bias.position_weights, bias.time_weights), grad_out)
    explicit = hstu_attn_reference_backward(grad_out, q, k, v, OFFSETS, MAX_LEN, **arguments)
    for got, want in zip(explicit, expected):
        assert got is not None and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_explicit_backward_returns_none_for_absent_inputs() -> None:
    q = torch.randn(3, 1, 2)
    grads = hstu_attn_reference_backward(torch.randn(3, 1, 2), q, q, q, torch.tensor([0, 3]), 3)
    assert [g is None for g in grads] == [False, False, False, True, True, True]
