"""Row-sparse embedding optimizers against torch's optimizers on the same gradients."""

from __future__ import annotations

import pytest
import torch

from gr_models.configs import EmbeddingOptimizerParam
from gr_models.modules.sparse_optimizer import SparseRowOptimizer


def _sparse_grad(rows: list[int], num_rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    indices = torch.tensor([rows])
    values = torch.randn(len(rows), dim, generator=generator)
    return torch.sparse_coo_tensor(indices, values, (num_rows, dim), check_invariants=True)


def _run(ours: torch.optim.Optimizer, ref: torch.optim.Optimizer, a: torch.Tensor, b: torch.Tensor, steps, dense_ref):
    generator = torch.Generator().manual_seed(0)
    for rows in steps:
        grad = _sparse_grad(rows, a.shape[0], a.shape[1], generator)
        a.grad = grad.clone()
        b.grad = grad.to_dense() if dense_ref else grad.clone()
        ours.step()
        ref.step()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# rows repeat within a step (duplicates are summed) and some rows are never touched
STEPS = [[0, 3, 3], [1, 3], [4, 0, 0, 1]]


def test_adam_matches_torch_sparse_adam() -> None:
    # SparseAdam adds eps to sqrt(v) before the bias correction, Adam (and we) after it: with eps 1e-8 the two
    # agree within the tolerance (with 1e-6 about one random start in four differed by ~2e-6); the placement of
    # eps itself is checked against Adam below.
    a = torch.nn.Parameter(torch.randn(6, 4))
    b = torch.nn.Parameter(a.detach().clone())
    ours = SparseRowOptimizer([a], EmbeddingOptimizerParam("adam", 0.1, adam_beta1=0.8, adam_beta2=0.95, eps=1e-8))
    ref = torch.optim.SparseAdam([b], lr=0.1, betas=(0.8, 0.95), eps=1e-8)
    untouched = a.detach()[5].clone()
    _run(ours, ref, a, b, STEPS, dense_ref=False)
    assert torch.equal(a.detach()[5], untouched)


def test_adagrad_matches_torch_adagrad_on_sparse_gradients() -> None:
    a = torch.nn.Parameter(torch.randn(6, 4))
    b = torch.nn.Parameter(a.detach().clone())
    ours = SparseRowOptimizer([a], EmbeddingOptimizerParam("adagrad", 0.3, eps=1e-10))
    ref = torch.optim.Adagrad([b], lr=0.3, eps=1e-10)
    _run(ours, ref, a, b, STEPS, dense_ref=False)


def test_sgd_with_weight_decay_matches_torch_sgd_when_every_row_is_touched() -> None:
    a = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(a.detach().clone())
    ours = SparseRowOptimizer([a], EmbeddingOptimizerParam("sgd", 0.5, weight_decay=0.1))
    ref = torch.optim.SGD([b], lr=0.5, weight_decay=0.1)
    _run(ours, ref, a, b, [[0, 1, 2], [2, 1, 0]], dense_ref=True)


def test_adamw_matches_torch_adamw_when_every_row_is_touched() -> None:
    a = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(a.detach().clone())
    ours = SparseRowOptimizer([a], EmbeddingOptimizerParam("adamw", 0.05, weight_decay=0.2))
    ref = torch.optim.AdamW([b], lr=0.05, weight_decay=0.2, betas=(0.9, 0.999), eps=1e-8)
    _run(ours, ref, a, b, [[0, 1, 2], [1, 2, 0], [2, 0, 1]], dense_ref=True)


def test_adam_eps_goes_after_the_bias_correction_as_in_torch_adam() -> None:
    a = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(a.detach().clone())
    ours = SparseRowOptimizer([a], EmbeddingOptimizerParam("adam", 0.1, adam_beta1=0.8, adam_beta2=0.95, eps=1e-2))
    ref = torch.optim.Adam([b], lr=0.1, betas=(0.8, 0.95), eps=1e-2)
    _run(ours, ref, a, b, [[0, 1, 2, 2], [2, 1, 0], [1, 0, 2]], dense_ref=True)


def test_rowwise_adagrad_keeps_one_accumulator_per_row() -> None:
    weight = torch.nn.Parameter(torch.zeros(3, 2))
    optimizer = SparseRowOptimizer([weight], EmbeddingOptimizerParam("rowwise_adagrad", 1.0, eps=0.0))
    weight.grad = torch.sparse_coo_tensor(
        torch.tensor([[1]]), torch.tensor([[3.0, 4.0]]), (3, 2), check_invariants=True
    )
    optimizer.step()
    # accumulator = mean(g^2) = 12.5; update = g / sqrt(12.5)
    assert optimizer.state[weight]["sum"].tolist() == [0.0, 12.5, 0.0]
    torch.testing.assert_close(weight.detach()[1], -torch.tensor([3.0, 4.0]) / 12.5**0.5)
    assert weight.detach()[0].abs().sum() == 0 and weight.detach()[2].abs().sum() == 0


def test_dense_gradient_rows_with_zero_gradient_are_not_touched() -> None:
    weight = torch.nn.Parameter(torch.ones(3, 2))
    optimizer = SparseRowOptimizer([weight], EmbeddingOptimizerParam("adam", 0.1))
    weight.grad = torch.tensor([[0.0, 0.0], [1.0, -1.0], [0.0, 0.0]])
    optimizer.step()
    assert optimizer.state[weight]["exp_avg"][0].abs().sum() == 0
    assert weight.detach()[0].tolist() == [1.0, 1.0] and weight.detach()[2].tolist() == [1.0, 1.0]


def test_bad_optimizer_name_and_weight_shape_fail_clearly() -> None:
    with pytest.raises(ValueError, match="unknown embedding optimizer"):
        EmbeddingOptimizerParam("lamb", 0.1)
    with pytest.raises(ValueError, match="2-D"):
        SparseRowOptimizer([torch.nn.Parameter(torch.zeros(3))], EmbeddingOptimizerParam("sgd", 0.1))
