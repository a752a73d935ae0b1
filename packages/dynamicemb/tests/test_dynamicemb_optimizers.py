"""Fused optimizers of dynamic tables against torch.optim on an nn.Embedding holding the same rows.

Every step's batch holds every row at least once (plus repeated ids), so the fused (sparse, one
step counter per table) semantics and torch.optim's dense ones coincide; the tests at the end
show where they differ by design and what the fused semantics are then.
"""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dynamicemb import (
    DynamicEmbeddingCollection,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbTableOptions,
)

ROWS, DIM, STEPS = 12, 6, 5
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def _collection(args: DynamicEmbOptimizerArgs, initial: torch.Tensor, dtype_name: str = "FP32"):
    from torchrec.modules.embedding_configs import DataType

    config = EmbeddingConfig(
        name="t", embedding_dim=DIM, num_embeddings=ROWS, feature_names=["f"], data_type=DataType[dtype_name]
    )
    collection = DynamicEmbeddingCollection(tables=[config], optimizer=args, table_options=DynamicEmbTableOptions())
    table = collection.dynamic_embedding_tables()["t"]
    keys = torch.arange(ROWS)
    table.import_rows(keys, initial.to(table.dtype), None, torch.zeros(ROWS, dtype=torch.int64))
    return collection, table


def _rows(table) -> torch.Tensor:
    return table.lookup(torch.arange(ROWS), training=False)[0].float()


def _batches(generator: torch.Generator, steps: int = STEPS, every_row: bool = True) -> list[torch.Tensor]:
    batches = []
    for _ in range(steps):
        extra = torch.randint(0, ROWS, (7,), generator=generator)
        ids = torch.cat([torch.randperm(ROWS, generator=generator), extra]) if every_row else extra
        batches.append(ids[torch.randperm(ids.numel(), generator=generator)])
    return batches


def _kjt(ids: torch.Tensor) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=ids, lengths=torch.tensor([ids.numel()]))


def _train_pair(args: DynamicEmbOptimizerArgs, make_torch_optimizer, clip: float | None, batches, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    initial = torch.randn(ROWS, DIM, generator=generator)
    collection, table = _collection(args, initial)
    reference = torch.nn.Embedding(ROWS, DIM, _weight=initial.clone())
    optimizer = make_torch_optimizer(reference.parameters())
    for ids in batches:
        target = torch.randn(ids.numel(), DIM, generator=generator)
        out = collection(_kjt(ids))["f"].values()
        (out * target).sum().backward()
        optimizer.zero_grad()
        (reference(ids) * target).sum().backward()
        if clip is not None:
            torch.nn.utils.clip_grad_value_(reference.parameters(), clip)
        optimizer.step()
    assert not torch.allclose(_rows(table), initial)  # training moved the rows
    return _rows(table), reference.weight.detach(), table


def _torch_sgd(params, a: DynamicEmbOptimizerArgs) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=a.learning_rate, weight_decay=a.weight_decay)


def _torch_adam(params, a: DynamicEmbOptimizerArgs) -> torch.optim.Optimizer:
    return torch.optim.Adam(
        params, lr=a.learning_rate, betas=(a.beta1, a.beta2), eps=a.eps, weight_decay=a.weight_decay
    )


def _torch_adamw(params, a: DynamicEmbOptimizerArgs) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        params, lr=a.learning_rate, betas=(a.beta1, a.beta2), eps=a.eps, weight_decay=a.weight_decay
    )


def _torch_adagrad(params, a: DynamicEmbOptimizerArgs) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(
        params,
        lr=a.learning_rate,
        eps=a.eps,
        weight_decay=a.weight_decay,
        initial_accumulator_value=a.initial_accumulator_value,
    )


CASES = {
    "sgd": (DynamicEmbOptimizerType.SGD, _torch_sgd),
    "adam": (DynamicEmbOptimizerType.ADAM, _torch_adam),
    "adamw": (DynamicEmbOptimizerType.ADAMW, _torch_adamw),
    "adagrad": (DynamicEmbOptimizerType.ADAGRAD, _torch_adagrad),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_fused_optimizer_matches_torch_optim(name: str, weight_decay: float, clip: float | None) -> None:
    kind, make = CASES[name]
    args = DynamicEmbOptimizerArgs(
        optimizer=kind,
        learning_rate=0.05,
        beta1=0.8,
        beta2=0.95,
        eps=1e-6,
        weight_decay=weight_decay,
        initial_accumulator_value=0.1 if kind is DynamicEmbOptimizerType.ADAGRAD else 0.0,
        gradient_clipping=clip is not None,
        max_gradient=clip or 1.0,
    )
    batches = _batches(torch.Generator().manual_seed(1))
    ours, reference, table = _train_pair(args, lambda p: make(p, args), clip, batches)
    torch.testing.assert_close(ours, reference, **TOLERANCE)
    assert table.optimizer.step == STEPS


def _rowwise_adagrad_reference(weight, accumulator, grad, args: DynamicEmbOptimizerArgs):
    """fbgemm's EXACT_ROWWISE_ADAGRAD, one row at a time."""
    for row in range(weight.shape[0]):
        g = grad[row]
        if args.gradient_clipping:
            g = g.clamp(-args.max_gradient, args.max_gradient)
        if args.weight_decay:
            g = g + args.weight_decay * weight[row]
        accumulator[row] += (g * g).mean()
        weight[row] -= args.learning_rate * g / (accumulator[row].sqrt() + args.eps)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_rowwise_adagrad_matches_reference(weight_decay: float, clip: float | None) -> None:
    args = DynamicEmbOptimizerArgs(
        optimizer=DynamicEmbOptimizerType.ROWWISE_ADAGRAD,
        learning_rate=0.1,
        eps=1e-6,
        weight_decay=weight_decay,
        gradient_clipping=clip is not None,
        max_gradient=clip or 1.0,
    )
    generator = torch.Generator().manual_seed(3)
    initial = torch.randn(ROWS, DIM, generator=generator)
    collection, table = _collection(args, initial)
    weight, accumulator = initial.clone(), torch.zeros(ROWS)
    for ids in _batches(generator):
        target = torch.randn(ids.numel(), DIM, generator=generator)
        (collection(_kjt(ids))["f"].values() * target).sum().backward()
        grad = torch.zeros(ROWS, DIM).index_add_(0, ids, target)
        _rowwise_adagrad_reference(weight, accumulator, grad, args)
    torch.testing.assert_close(_rows(table), weight, **TOLERANCE)
    state = table.store.find(torch.arange(ROWS))[0][:, DIM:]
    torch.testing.assert_close(state.squeeze(1), accumulator, **TOLERANCE)


def test_adam_state_is_stored_beside_the_embedding() -> None:
    args = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=0.1, beta1=0.5, beta2=0.75)
    collection, table = _collection(args, torch.zeros(ROWS, DIM))
    ids = torch.tensor([0, 0, 1])
    collection(_kjt(ids))["f"].values().sum().backward()
    values, _ = table.store.find(torch.tensor([0, 1, 2]))
    assert values.shape == (3, 3 * DIM)
    grad = torch.tensor([2.0, 1.0, 0.0]).unsqueeze(1).expand(3, DIM)
    torch.testing.assert_close(values[:, DIM : 2 * DIM], 0.5 * grad)  # m = (1 - beta1) g
    torch.testing.assert_close(values[:, 2 * DIM :], 0.25 * grad**2)  # v = (1 - beta2) g^2


def test_rows_absent_from_a_step_keep_weight_and_state_like_torchrec() -> None:
    """Adam: fused updates touch only rows in the batch and use one step counter per table, which is
    what torch.optim.SparseAdam does; dense torch.optim.Adam moves absent rows by their momentum."""
    args = DynamicEmbOptimizerArgs(
        optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=0.05, beta1=0.8, beta2=0.95, eps=1e-6
    )
    generator = torch.Generator().manual_seed(5)
    batches = _batches(generator, steps=6, every_row=False)
    present_in_last = torch.zeros(ROWS, dtype=torch.bool)
    present_in_last[batches[-1]] = True
    assert not bool(present_in_last.all())  # some rows sit out the last step
    initial = torch.randn(ROWS, DIM, generator=generator)
    collection, table = _collection(args, initial)
    sparse_reference = torch.nn.Embedding(ROWS, DIM, sparse=True, _weight=initial.clone())
    sparse_adam = torch.optim.SparseAdam(sparse_reference.parameters(), lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    dense_reference = torch.nn.Embedding(ROWS, DIM, _weight=initial.clone())
    dense_adam = torch.optim.Adam(dense_reference.parameters(), lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    for ids in batches:
        target = torch.randn(ids.numel(), DIM, generator=generator)
        before = _rows(table)
        (collection(_kjt(ids))["f"].values() * target).sum().backward()
        absent = torch.ones(ROWS, dtype=torch.bool)
        absent[ids] = False
        assert torch.equal(_rows(table)[absent], before[absent])
        for reference, optimizer in ((sparse_reference, sparse_adam), (dense_reference, dense_adam)):
            optimizer.zero_grad()
            (reference(ids) * target).sum().backward()
            optimizer.step()
    # SparseAdam puts eps outside the bias correction of v; with eps small against sqrt(v) it agrees.
    torch.testing.assert_close(_rows(table), sparse_reference.weight.detach(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_rows(table)[~present_in_last], dense_reference.weight.detach()[~present_in_last])
    assert table.optimizer.step == len(batches)


@pytest.mark.parametrize("kind", [DynamicEmbOptimizerType.SGD, DynamicEmbOptimizerType.ADAGRAD])
def test_stateless_absent_rows_match_dense_torch(kind: DynamicEmbOptimizerType) -> None:
    """SGD and AdaGrad without weight decay leave a row with zero gradient unchanged, so dense torch agrees."""
    args = DynamicEmbOptimizerArgs(optimizer=kind, learning_rate=0.1, eps=1e-6)
    make = CASES["sgd" if kind is DynamicEmbOptimizerType.SGD else "adagrad"][1]
    batches = _batches(torch.Generator().manual_seed(7), every_row=False)
    ours, reference, _ = _train_pair(args, lambda p: make(p, args), None, batches)
    torch.testing.assert_close(ours, reference, **TOLERANCE)


def test_bf16_table_trains_close_to_fp32() -> None:
    args = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=0.05)
    generator = torch.Generator().manual_seed(11)
    initial = torch.randn(ROWS, DIM, generator=generator)
    fp32, fp32_table = _collection(args, initial)
    bf16, bf16_table = _collection(args, initial, "BF16")
    for ids in _batches(generator):
        target = torch.randn(ids.numel(), DIM, generator=generator)
        out = bf16(_kjt(ids))["f"].values()
        assert out.dtype == torch.bfloat16
        (out.float() * target).sum().backward()
        (fp32(_kjt(ids))["f"].values() * target).sum().backward()
    torch.testing.assert_close(_rows(bf16_table), _rows(fp32_table), rtol=0.02, atol=0.02)


def test_fused_params_map_to_optimizer_args() -> None:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

    args = DynamicEmbOptimizerArgs.from_fused_params(
        {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.3, "beta1": 0.7, "weight_decay": 0.1,
         "weight_decay_mode": WeightDecayMode.DECOUPLE, "output_dtype": "ignored"}
    )  # fmt: skip
    assert args.optimizer is DynamicEmbOptimizerType.ADAMW
    assert (args.learning_rate, args.beta1, args.weight_decay) == (0.3, 0.7, 0.1)
    assert DynamicEmbOptimizerArgs.from_fused_params({"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD}).optimizer is (
        DynamicEmbOptimizerType.ROWWISE_ADAGRAD
    )
    with pytest.raises(ValueError, match="LAMB"):
        DynamicEmbOptimizerArgs.from_fused_params({"optimizer": EmbOptimType.LAMB})
    assert DynamicEmbOptimizerArgs.from_json(args.to_json()) == args
