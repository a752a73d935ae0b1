"""ShardedEmbedding: static model-/data-parallel TorchRec tables and dynamic tables behind one KJT interface."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gr_models.configs import DynamicShardedEmbeddingConfig, EmbeddingOptimizerParam, ShardedEmbeddingConfig
from gr_models.modules.embedding import ShardedEmbedding
from gr_models.utils.tensor_initializer import ConstantInitializer

ADAM = EmbeddingOptimizerParam("adam", 0.1)


def _collection() -> ShardedEmbedding:
    return ShardedEmbedding(
        [
            ShardedEmbeddingConfig(["user"], "user_table", 5, 4, optimizer_param=ADAM),
            ShardedEmbeddingConfig(["action"], "action_table", 3, 4, sharding_type="data_parallel"),
            DynamicShardedEmbeddingConfig(
                ["item"], "item_table", 64, 4, initializer=ConstantInitializer(0.5), optimizer_param=ADAM
            ),
        ]
    )


def _features(user, action, item, timestamps=None) -> KeyedJaggedTensor:
    keys = ["user", "action", "item"] + (["ts"] if timestamps is not None else [])
    parts = [user, action, item] + ([timestamps] if timestamps is not None else [])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.tensor([v for part in parts for row in part for v in row]),
        lengths=torch.tensor([len(row) for part in parts for row in part]),
    )


def test_lookup_returns_table_rows_per_feature_and_ignores_unserved_keys() -> None:
    embedding = _collection()
    features = _features([[1], [4]], [[0, 2], [1]], [[10**12, 7], [7]], timestamps=[[5, 6], [7]])
    out = embedding(features)
    assert set(out) == {"user", "action", "item"}
    user_table = embedding.model_parallel.embeddings["user_table"].weight
    torch.testing.assert_close(out["user"].values(), user_table[[1, 4]])
    assert out["action"].lengths().tolist() == [2, 1]
    # a dynamic table takes any int64 id and initializes new rows with its initializer
    assert out["item"].values().shape == (3, 4) and out["item"].values().eq(0.5).all()


def test_static_tables_get_sparse_gradients_and_row_sparse_optimizers() -> None:
    embedding = _collection()
    out = embedding(_features([[1], [1]], [[0], [2]], [[3], [4]]))
    (out["user"].values().sum() + out["action"].values().sum()).backward()
    user_weight = embedding.model_parallel.embeddings["user_table"].weight
    assert user_weight.grad.is_sparse
    assert not embedding.data_parallel.embeddings["action_table"].weight.grad.is_sparse
    before = user_weight.detach().clone()
    optimizers = embedding.sparse_optimizers()
    assert sorted(optimizers) == ["action_table", "user_table"]
    for optimizer in optimizers.values():
        optimizer.step()
    moved = (user_weight.detach() != before).any(dim=1)
    assert moved.tolist() == [False, True, False, False, False]


def test_dynamic_rows_train_in_backward_and_eval_never_inserts() -> None:
    embedding = _collection()
    features = _features([[0]], [[0]], [[42]])
    embedding(features)["item"].values().sum().backward()
    after = embedding(features)["item"].values().detach()
    assert (after < 0.5).all()  # Adam moved the row against the all-ones gradient
    embedding.eval()
    unseen = embedding(_features([[0]], [[0]], [[99]]))["item"].values()
    assert unseen.eq(0).all()


def test_bad_inputs_fail_with_names() -> None:
    embedding = _collection()
    with pytest.raises(ValueError, match=r"feature 'user': ids must lie in \[0, 5\) of table 'user_table'"):
        embedding(_features([[5]], [[0]], [[1]]))
    features = KeyedJaggedTensor.from_lengths_sync(keys=["user"], values=torch.tensor([1]), lengths=torch.tensor([1]))
    with pytest.raises(ValueError, match="lacks features"):
        embedding(features)
    with pytest.raises(KeyError, match="has no embedding table"):
        embedding.table_of("genre")
    with pytest.raises(ValueError, match="share one dim"):
        ShardedEmbedding([ShardedEmbeddingConfig(["a"], "a", 3, 4), ShardedEmbeddingConfig(["b"], "b", 3, 8)])
