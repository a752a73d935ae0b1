"""The standalone collections against TorchRec's EmbeddingCollection / EmbeddingBagCollection."""

from __future__ import annotations

import warnings

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dynamicemb import (
    DynamicEmbCheckMode,
    DynamicEmbeddingBagCollection,
    DynamicEmbeddingCollection,
    DynamicEmbEvictStrategy,
    DynamicEmbInitializerArgs,
    DynamicEmbInitializerMode,
    DynamicEmbOptimizerArgs,
    DynamicEmbScoreStrategy,
    DynamicEmbTableOptions,
)

ROWS = 20


def _copy_rows(torchrec_module, dynamic_module) -> None:
    """Load TorchRec's initial rows into the dynamic tables (key i = row i)."""
    modules = getattr(torchrec_module, "embeddings", None) or torchrec_module.embedding_bags
    for name, table in dynamic_module.dynamic_embedding_tables().items():
        weight = modules[name].weight.detach()
        table.import_rows(torch.arange(weight.shape[0]), weight, None, torch.zeros(weight.shape[0], dtype=torch.int64))


def _kjt(batch: int = 3, seed: int = 0, weighted: bool = False) -> KeyedJaggedTensor:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (3 * batch,), generator=generator)
    lengths[0] = 0  # an empty bag
    values = torch.randint(0, ROWS, (int(lengths.sum()),), generator=generator)
    weights = torch.rand(values.numel(), generator=generator) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=["a", "b", "c"], values=values, lengths=lengths, weights=weights)


EC_CONFIGS = [
    EmbeddingConfig(name="t0", embedding_dim=4, num_embeddings=ROWS, feature_names=["a", "b"]),
    EmbeddingConfig(name="t1", embedding_dim=4, num_embeddings=ROWS, feature_names=["c", "a"]),
]


def test_embedding_collection_matches_torchrec_forward_and_one_sgd_step() -> None:
    reference = EmbeddingCollection(tables=EC_CONFIGS, device=torch.device("cpu"), need_indices=True)
    ours = DynamicEmbeddingCollection(
        tables=EC_CONFIGS,
        device=torch.device("cpu"),
        need_indices=True,
        optimizer=DynamicEmbOptimizerArgs(learning_rate=0.1),
    )
    _copy_rows(reference, ours)
    features = _kjt()
    expected, got = reference(features), ours(features)
    assert list(got) == list(expected) == ["a@t0", "b", "c", "a@t1"]
    for name in expected:
        torch.testing.assert_close(got[name].values(), expected[name].values())
        assert torch.equal(got[name].lengths(), expected[name].lengths())
        assert torch.equal(got[name].weights(), expected[name].weights())
    assert ours.embedding_names_by_table() == reference.embedding_names_by_table()
    assert ours.need_indices() and ours.embedding_dim() == 4
    # One SGD step with the same loss: the dynamic rows equal TorchRec's after a dense SGD step.
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    targets = {name: torch.randn_like(jt.values()) for name, jt in expected.items()}
    sum((expected[n].values() * targets[n]).sum() for n in expected).backward()
    sgd.step()
    sum((got[n].values() * targets[n]).sum() for n in got).backward()
    for name, table in ours.dynamic_embedding_tables().items():
        rows = table.lookup(torch.arange(ROWS), training=False)[0]
        torch.testing.assert_close(rows, reference.embeddings[name].weight.detach())


@pytest.mark.parametrize(
    ("pooling", "weighted"), [(PoolingType.SUM, False), (PoolingType.MEAN, False), (PoolingType.SUM, True)]
)
def test_embedding_bag_collection_matches_torchrec(pooling: PoolingType, weighted: bool) -> None:
    configs = [
        EmbeddingBagConfig(name="t0", embedding_dim=3, num_embeddings=ROWS, feature_names=["a", "c"], pooling=pooling),
        EmbeddingBagConfig(name="t1", embedding_dim=5, num_embeddings=ROWS, feature_names=["b"], pooling=pooling),
    ]
    reference = EmbeddingBagCollection(tables=configs, is_weighted=weighted, device=torch.device("cpu"))
    ours = DynamicEmbeddingBagCollection(
        tables=configs, is_weighted=weighted, device=torch.device("cpu"), optimizer={"learning_rate": 0.2}
    )
    _copy_rows(reference, ours)
    features = _kjt(batch=4, seed=2, weighted=weighted)
    expected, got = reference(features), ours(features)
    assert got.keys() == expected.keys() == ["a", "c", "b"]
    assert got.length_per_key() == expected.length_per_key()
    torch.testing.assert_close(got.values(), expected.values())
    target = torch.randn_like(expected.values())
    (expected.values() * target).sum().backward()
    torch.optim.SGD(reference.parameters(), lr=0.2).step()
    (got.values() * target).sum().backward()
    for name, table in ours.dynamic_embedding_tables().items():
        rows = table.lookup(torch.arange(ROWS), training=False)[0]
        torch.testing.assert_close(rows, reference.embedding_bags[name].weight.detach())


def test_weighted_mean_divides_the_weighted_sum_by_the_bag_length() -> None:
    """TorchRec's unsharded EmbeddingBagCollection refuses weighted MEAN; ours pools like fbgemm's TBE."""
    features = _kjt(batch=4, seed=5, weighted=True)
    pooled = {}
    for pooling in (PoolingType.SUM, PoolingType.MEAN):
        config = EmbeddingBagConfig(
            name="t", embedding_dim=3, num_embeddings=ROWS, feature_names=["a", "b", "c"], pooling=pooling
        )
        torch.manual_seed(0)
        pooled[pooling] = DynamicEmbeddingBagCollection(tables=[config], is_weighted=True)(features).values()
    lengths = features.lengths().view(3, 4).t().repeat_interleave(3, dim=1).clamp(min=1)
    torch.testing.assert_close(pooled[PoolingType.MEAN], pooled[PoolingType.SUM] / lengths)


def test_eval_mode_never_inserts_and_returns_eval_initializer_values() -> None:
    config = EmbeddingConfig(name="t", embedding_dim=3, num_embeddings=100, feature_names=["a"])
    options = DynamicEmbTableOptions(
        eval_initializer_args=DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.CONSTANT, value=0.5)
    )
    ours = DynamicEmbeddingCollection(tables=[config], table_options={"t": options})
    table = ours.dynamic_embedding_tables()["t"]
    train_ids = KeyedJaggedTensor.from_lengths_sync(keys=["a"], values=torch.tensor([1, 2]), lengths=torch.tensor([2]))
    trained = ours(train_ids)["a"].values().detach()
    ours.eval()
    ids = KeyedJaggedTensor.from_lengths_sync(keys=["a"], values=torch.tensor([2, 77, 1]), lengths=torch.tensor([3]))
    out = ours(ids)["a"].values()
    assert not out.requires_grad
    torch.testing.assert_close(out[0], trained[1])
    torch.testing.assert_close(out[1], torch.full((3,), 0.5))
    torch.testing.assert_close(out[2], trained[0])
    assert table.size() == 2
    default_zeros = DynamicEmbeddingCollection(tables=[config]).eval()
    assert default_zeros(ids)["a"].values().abs().sum() == 0


def test_training_under_no_grad_inserts_without_updating() -> None:
    config = EmbeddingConfig(name="t", embedding_dim=3, num_embeddings=100, feature_names=["a"])
    ours = DynamicEmbeddingCollection(tables=[config])
    ids = KeyedJaggedTensor.from_lengths_sync(keys=["a"], values=torch.tensor([5, 6]), lengths=torch.tensor([2]))
    with torch.no_grad():
        first = ours(ids)["a"].values()
    assert ours.dynamic_embedding_tables()["t"].size() == 2
    torch.testing.assert_close(ours(ids)["a"].values().detach(), first)


def test_input_errors_name_the_problem() -> None:
    config = EmbeddingConfig(name="t", embedding_dim=3, num_embeddings=100, feature_names=["a"])
    ours = DynamicEmbeddingCollection(tables=[config])
    with pytest.raises(KeyError, match="'a' is missing"):
        ours(KeyedJaggedTensor.from_lengths_sync(keys=["z"], values=torch.tensor([1]), lengths=torch.tensor([1])))
    with pytest.raises(TypeError, match="int64 or int32"):
        ours(KeyedJaggedTensor.from_lengths_sync(keys=["a"], values=torch.tensor([1.0]), lengths=torch.tensor([1])))
    with pytest.raises(ValueError, match="meta"):
        DynamicEmbeddingCollection(tables=[config], device=torch.device("meta"))
    with pytest.raises(KeyError, match="unknown tables"):
        DynamicEmbeddingCollection(tables=[config], table_options={"nope": DynamicEmbTableOptions()})
    with pytest.raises(ValueError, match="pooling"):
        DynamicEmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name="t", embedding_dim=3, num_embeddings=9, feature_names=["a"], pooling=PoolingType.NONE
                )
            ]
        )
    strict = DynamicEmbeddingCollection(tables=[config], table_options=DynamicEmbTableOptions(index_type=torch.int64))
    with pytest.raises(TypeError, match="index_type"):
        strict(
            KeyedJaggedTensor.from_lengths_sync(
                keys=["a"], values=torch.tensor([1], dtype=torch.int32), lengths=torch.tensor([1])
            )
        )
    with pytest.raises(ValueError, match="training is False"):
        DynamicEmbeddingCollection(
            tables=[config],
            table_options=DynamicEmbTableOptions(training=False),
            optimizer=DynamicEmbOptimizerArgs(optimizer="adam"),
        )


def _full_table_then_refused(mode: DynamicEmbCheckMode):
    config = EmbeddingConfig(name="t", embedding_dim=2, num_embeddings=8, feature_names=["a"])
    options = DynamicEmbTableOptions(
        score_strategy=DynamicEmbScoreStrategy.CUSTOMIZED, bucket_capacity=8, max_capacity=8, safe_check_mode=mode
    )
    ours = DynamicEmbeddingCollection(tables=[config], table_options=options)
    table = ours.dynamic_embedding_tables()["t"]
    table.set_score(100)
    ours(KeyedJaggedTensor.from_lengths_sync(keys=["a"], values=torch.arange(8), lengths=torch.tensor([8])))
    table.set_score(1)
    late = KeyedJaggedTensor.from_lengths_sync(keys=["a"], values=torch.tensor([3, 90]), lengths=torch.tensor([2]))
    return ours, late


def test_safe_check_mode_ignore_warn_error() -> None:
    ours, late = _full_table_then_refused(DynamicEmbCheckMode.IGNORE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ours(late)["a"].values()
    assert out[1].abs().sum() == 0 and out[0].abs().sum() > 0  # refused key 90 reads zeros
    ours, late = _full_table_then_refused(DynamicEmbCheckMode.WARNING)
    with pytest.warns(RuntimeWarning, match="1 of 2 keys"):
        ours(late)
    ours, late = _full_table_then_refused(DynamicEmbCheckMode.ERROR)
    with pytest.raises(RuntimeError, match="'t': 1 of 2 keys"):
        ours(late)


def _touch(collection, ids: list[int]) -> None:
    collection(
        KeyedJaggedTensor.from_lengths_sync(keys=["a"], values=torch.tensor(ids), lengths=torch.tensor([len(ids)]))
    )


def test_lru_evicts_the_least_recently_used_key() -> None:
    config = EmbeddingConfig(name="t", embedding_dim=2, num_embeddings=8, feature_names=["a"])
    options = DynamicEmbTableOptions(score_strategy=DynamicEmbEvictStrategy.LRU, bucket_capacity=8, max_capacity=8)
    ours = DynamicEmbeddingCollection(tables=[config], table_options=options)
    table = ours.dynamic_embedding_tables()["t"]
    for key in range(8):
        _touch(ours, [key])
    _touch(ours, [0, 1, 3, 4, 5, 6, 7])  # key 2 is now the least recently used
    _touch(ours, [100])
    assert table.store.contains(torch.tensor([2, 100, 0])).tolist() == [False, True, True]


def test_step_scores_record_the_step_of_the_last_touch() -> None:
    config = EmbeddingConfig(name="t", embedding_dim=2, num_embeddings=64, feature_names=["a"])
    ours = DynamicEmbeddingCollection(
        tables=[config], table_options=DynamicEmbTableOptions(score_strategy=DynamicEmbScoreStrategy.STEP)
    )
    table = ours.dynamic_embedding_tables()["t"]
    _touch(ours, [1, 2])
    _touch(ours, [2, 3])
    scores = {k: s for keys, _, _, sc in table.export() for k, s in zip(keys.tolist(), sc.tolist())}
    assert scores == {1: 1, 2: 2, 3: 2}
    assert table.get_score() == 3


def test_lfu_scores_count_occurrences() -> None:
    config = EmbeddingConfig(name="t", embedding_dim=2, num_embeddings=64, feature_names=["a"])
    ours = DynamicEmbeddingCollection(
        tables=[config], table_options=DynamicEmbTableOptions(score_strategy=DynamicEmbScoreStrategy.LFU)
    )
    table = ours.dynamic_embedding_tables()["t"]
    _touch(ours, [1, 2, 2])
    _touch(ours, [2, 3])
    scores = {k: s for keys, _, _, sc in table.export() for k, s in zip(keys.tolist(), sc.tolist())}
    assert scores[1] == 1 and scores[3] == 1 and scores[2] >= 2
    assert table.get_score() is None


def test_empty_features_duplicate_ids_and_int64_extremes() -> None:
    config = EmbeddingConfig(name="t", embedding_dim=3, num_embeddings=100, feature_names=["a", "b"])
    ours = DynamicEmbeddingCollection(tables=[config], optimizer=DynamicEmbOptimizerArgs(learning_rate=1.0))
    table = ours.dynamic_embedding_tables()["t"]
    empty = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.zeros(0, dtype=torch.int64), lengths=torch.zeros(4, dtype=torch.int64)
    )
    out = ours(empty)
    assert out["a"].values().shape == (0, 3) and out["b"].lengths().tolist() == [0, 0]
    extremes = torch.tensor([torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max, -1, 0])
    same = torch.full((5,), 7, dtype=torch.int32)
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.cat([extremes, same.long()]), lengths=torch.tensor([4, 0, 2, 3])
    )
    out = ours(features)
    assert torch.equal(out["b"].values(), out["b"].values()[:1].expand(5, 3))  # one row for the repeated id
    before = table.lookup(extremes, training=False)[0]
    (out["a"].values().sum() + out["b"].values().sum()).backward()
    torch.testing.assert_close(table.lookup(extremes, training=False)[0], before - 1.0)
    torch.testing.assert_close(table.lookup(torch.tensor([7]), training=False)[0], out["b"].values()[:1].detach() - 5.0)
    assert table.size() == 5
