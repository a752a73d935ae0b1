"""Batches with no ids for a table, and KeyedJaggedTensors whose lengths do not describe their ids.

An empty batch gives outputs that take part in autograd, as TorchRec's collections' outputs do, and its backward
changes no row and no optimizer step. A malformed KJT raises an error naming the feature before any key is inserted.
The sharded collections are checked in the ``empty_and_malformed_batches_two_ranks`` scenario.
"""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dynamicemb import (
    DynamicEmbeddingBagCollection,
    DynamicEmbeddingCollection,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
)

EC_CONFIGS = [
    EmbeddingConfig(name="t0", embedding_dim=4, num_embeddings=50, feature_names=["a", "b"]),
    EmbeddingConfig(name="t1", embedding_dim=4, num_embeddings=50, feature_names=["c"]),
]
EBC_CONFIGS = [
    EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=50, feature_names=["a", "b"]),
    EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=50, feature_names=["c"], pooling=PoolingType.MEAN),
]
ADAM = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=0.1)


def _kjt(values: list[int], lengths: list[int]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        keys=["a", "b", "c"], values=torch.tensor(values, dtype=torch.int64), lengths=torch.tensor(lengths)
    )


def _ec_values(out: dict) -> list[torch.Tensor]:
    return [jt.values() for jt in out.values()]


def _state(module) -> dict[str, tuple[int, int, torch.Tensor]]:
    """Per table: stored rows, optimizer step, and the rows of keys 0..9."""
    return {
        name: (table.size(), table.optimizer.step, table.lookup(torch.arange(10), training=False)[0])
        for name, table in module.dynamic_embedding_tables().items()
    }


def _assert_same_state(before: dict, after: dict) -> None:
    for name, (size, step, rows) in before.items():
        assert after[name][0] == size and after[name][1] == step, f"{name}: size/step changed by an empty batch"
        assert torch.equal(after[name][2], rows), f"{name}: rows changed by an empty batch"


@pytest.mark.parametrize("kind", ["collection", "bag_collection"])
def test_empty_batch_outputs_require_grad_like_torchrec_and_change_nothing(kind: str) -> None:
    empty = _kjt([], [0, 0, 0, 0, 0, 0])
    if kind == "collection":
        reference, ours = EmbeddingCollection(tables=EC_CONFIGS), DynamicEmbeddingCollection(EC_CONFIGS, optimizer=ADAM)
        expected, got = _ec_values(reference(empty)), _ec_values(ours(_kjt([1, 2], [1, 0, 0, 1, 0, 0])))
        got[0].sum().backward()  # a first step, so that optimizer state exists
        before = _state(ours)
        got = _ec_values(ours(empty))
    else:
        reference = EmbeddingBagCollection(tables=EBC_CONFIGS)
        ours = DynamicEmbeddingBagCollection(EBC_CONFIGS, optimizer=ADAM)
        expected = [reference(empty).values()]
        ours(_kjt([1, 2], [1, 0, 0, 1, 0, 0])).values().sum().backward()
        before = _state(ours)
        got = [ours(empty).values()]
    assert all(t.requires_grad for t in expected), "TorchRec's outputs of an empty batch require grad"
    assert [t.shape for t in got] == [t.shape for t in expected]
    assert all(t.requires_grad for t in got), "an empty batch's embeddings must take part in autograd"
    sum(t.sum() for t in got).backward()
    _assert_same_state(before, _state(ours))


def test_a_table_without_ids_beside_one_with_ids() -> None:
    ours = DynamicEmbeddingCollection(EC_CONFIGS, optimizer=ADAM)
    out = ours(_kjt([], [0, 0, 0, 0, 0, 0]))  # t1 (feature c) gets no ids in either step
    out = ours(_kjt([3, 4], [1, 1, 0, 0, 0, 0]))
    assert out["c"].values().shape == (0, 4) and out["c"].values().requires_grad
    (out["a"].values().sum() + out["c"].values().sum()).backward()
    tables = ours.dynamic_embedding_tables()
    assert tables["t0"].optimizer.step == 1 and tables["t1"].optimizer.step == 0
    assert tables["t0"].size() == 2 and tables["t1"].size() == 0


def test_empty_batch_in_eval_and_under_no_grad_is_plain_zeros() -> None:
    ours = DynamicEmbeddingCollection(EC_CONFIGS)
    with torch.no_grad():
        assert not any(t.requires_grad for t in _ec_values(ours(_kjt([], [0] * 6))))
    ours.eval()
    assert not any(t.requires_grad for t in _ec_values(ours(_kjt([], [0] * 6))))


MALFORMED = {
    "lengths_sum_above_ids": (
        dict(values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1, 1, 1, 0, 0])),
        ValueError,
        r"lengths sum to 4 but it holds 3 ids.*feature 'b'",
    ),
    "lengths_sum_below_ids": (
        dict(values=torch.tensor([1, 2, 3, 4, 5]), lengths=torch.tensor([1, 1, 0, 1, 0, 1])),
        ValueError,
        r"lengths sum to 4 but it holds 5 ids.*feature 'c'",
    ),
    "negative_length": (
        dict(values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1, 2, -1, 0, 0])),
        ValueError,
        r"feature 'b' has a negative length \(-1\)",
    ),
    "float_ids": (
        dict(values=torch.tensor([1.0, 2.0]), lengths=torch.tensor([1, 1, 0, 0, 0, 0])),
        TypeError,
        r"ids \(values\) of features \['a', 'b', 'c'\] must be int64 or int32; got torch.float32",
    ),
    "two_dimensional_ids": (
        dict(values=torch.tensor([[1, 2]]), lengths=torch.tensor([1, 0, 0, 0, 0, 0])),
        ValueError,
        r"values of features \['a', 'b', 'c'\] must be 1-D; got shape \(1, 2\)",
    ),
    "weights_per_id": (
        dict(values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1, 0, 0, 0, 0]), weights=torch.ones(3)),
        ValueError,
        r"one entry per id: \(3,\) weights for 2 ids",
    ),
    "lengths_not_a_batch": (
        dict(values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1, 0, 0, 0]), stride=2),
        ValueError,
        r"has 5 lengths; its 3 features \['a', 'b', 'c'\] with batch size 2 need 6",
    ),
}


@pytest.mark.parametrize("kind", ["collection", "bag_collection"])
@pytest.mark.parametrize("problem", MALFORMED.keys())
def test_malformed_kjt_is_refused_before_any_insert(problem: str, kind: str) -> None:
    fields, error, message = MALFORMED[problem]
    features = KeyedJaggedTensor(keys=["a", "b", "c"], **fields)
    if kind == "collection":
        ours = DynamicEmbeddingCollection(EC_CONFIGS)
    else:
        ours = DynamicEmbeddingBagCollection(EBC_CONFIGS, is_weighted="weights" in fields)
    with pytest.raises(error, match=message):
        ours(features)
    assert all(table.size() == 0 for table in ours.dynamic_embedding_tables().values()), "a key was inserted"


def test_offsets_that_go_backwards_are_a_negative_length() -> None:
    features = KeyedJaggedTensor(
        keys=["a", "b", "c"], values=torch.tensor([1, 2, 3]), offsets=torch.tensor([0, 2, 1, 3, 3, 3, 3])
    )
    with pytest.raises(ValueError, match="feature 'a' has a negative length"):
        DynamicEmbeddingCollection(EC_CONFIGS)(features)
