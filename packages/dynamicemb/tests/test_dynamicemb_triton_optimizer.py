"""The Triton fused optimizer kernel against the torch update (CPU: Triton interpreter, tiny sizes)."""

from __future__ import annotations

import pytest
import torch

from dynamicemb.optimizer import DynamicEmbOptimizerArgs, DynamicEmbOptimizerType, FusedOptimizer
from dynamicemb.triton_optimizer import fused_update_triton_

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _case(kind: DynamicEmbOptimizerType, dim: int, dtype: torch.dtype, variant: str, n: int, step: int):
    decay, clip = (0.0, None) if variant == "plain" else (0.1, 0.3)
    args = DynamicEmbOptimizerArgs(
        optimizer=kind, learning_rate=0.05, beta1=0.8, beta2=0.9, eps=1e-3, weight_decay=decay,
        gradient_clipping=clip is not None, max_gradient=clip or 1.0,
    )  # fmt: skip
    optimizer = FusedOptimizer(args, dim)
    generator = torch.Generator().manual_seed(dim + n)
    capacity = n + 7
    values = torch.randn(capacity, dim + optimizer.state_dim, generator=generator)
    values[:, dim:] = values[:, dim:].abs()  # accumulators and second moments are non-negative
    slots = torch.randperm(capacity, generator=generator)[:n]
    grads = torch.randn(n, dim, generator=generator)
    return optimizer, values.to(DEVICE, dtype), slots.to(DEVICE), grads.to(DEVICE), step


@pytest.mark.parametrize("kind", list(DynamicEmbOptimizerType))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "decay_and_clip"])
@pytest.mark.parametrize(("n", "dim"), [(1, 5), (19, 33), (3, 130)])
def test_triton_update_matches_torch(kind, dtype, variant: str, n: int, dim: int) -> None:
    optimizer, values, slots, grads, step = _case(kind, dim, dtype, variant, n, step=3)
    expected = values.clone()
    rows = expected[slots].float()
    optimizer.update_(rows, grads, step)
    expected[slots] = rows.to(dtype)
    fused_update_triton_(values, slots, grads, optimizer, step)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(values, expected, **tolerance)


def test_triton_update_of_no_rows_is_a_no_op() -> None:
    optimizer, values, slots, grads, step = _case(DynamicEmbOptimizerType.ADAM, 4, torch.float32, "plain", 1, 1)
    before = values.clone()
    fused_update_triton_(values, slots[:0], grads[:0], optimizer, step)
    assert torch.equal(values, before)
