"""The reference and the PYTORCH backend at benchmark sizes on a GPU: they fit and agree with autograd."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from hstu_attn import RelativeBias, hstu_attn_reference, hstu_attn_varlen_func
from hstu_attn.reference import hstu_attn_reference_backward

pytestmark = pytest.mark.gpu


def _jagged_problem(batch: int, max_len: int, min_len: int, dtype: torch.dtype, seed: int) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), device="cuda", generator=generator)
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    total, heads, dim = int(offsets[-1]), 4, 128

    def leaf(*shape: int, dtype: torch.dtype = dtype) -> Tensor:
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=generator).requires_grad_(True)

    return {
        "q": leaf(total, heads, dim),
        "k": leaf(total, heads, dim),
        "v": leaf(total, heads, dim),
        "seq_offsets": offsets,
        "max_seq_len": max_len,
        "num_targets": (lengths // 8),
        "max_attn_len": 256,
        "relative_bias": RelativeBias(
            position_weights=leaf(heads, 2 * 128 - 1, dtype=torch.float32),
            time_weights=leaf(1, 64, dtype=torch.float32),
            timestamps=torch.randint(0, 10**7, (total,), device="cuda", generator=generator),
        ),
    }


def _leaves(problem: dict) -> list[Tensor]:
    bias = problem["relative_bias"]
    return [problem["q"], problem["k"], problem["v"], bias.position_weights, bias.time_weights]


def test_explicit_backward_matches_autograd_at_b32_n1024_fp32() -> None:
    problem = _jagged_problem(32, 1024, 128, torch.float32, seed=0)
    grad_out = torch.randn_like(problem["v"])
    out = hstu_attn_reference(**problem)
    expected = torch.autograd.grad(out, _leaves(problem), grad_out)
    explicit = hstu_attn_reference_backward(grad_out, **problem)
    explicit = [grad for grad in explicit if grad is not None]
    for got, want in zip(explicit, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize(("batch", "max_len", "min_len"), [(32, 1024, 128), (16, 4096, 512)])
def test_pytorch_backend_runs_bf16_benchmark_shapes(batch: int, max_len: int, min_len: int) -> None:
    problem = _jagged_problem(batch, max_len, min_len, torch.bfloat16, seed=1)
    torch.cuda.reset_peak_memory_stats()
    out = hstu_attn_varlen_func(**problem, backend="pytorch")
    grads = torch.autograd.grad(out.float().square().sum(), _leaves(problem))
    torch.cuda.synchronize()
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    print(f"PYTORCH backend fwd+bwd B={batch} N={max_len} H=4 D=128 bf16: peak {peak_gib:.1f} GiB")
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(grad).all() for grad in grads)

    wide = {
        key: (value.detach().float() if isinstance(value, Tensor) and value.is_floating_point() else value)
        for key, value in problem.items()
    }
    with torch.no_grad():
        reference = hstu_attn_reference(**wide)
    error = (out.float() - reference).abs().max()
    assert error <= 0.02 * reference.abs().max(), (float(error), float(reference.abs().max()))
