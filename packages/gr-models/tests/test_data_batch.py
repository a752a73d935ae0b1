"""RankingBatch / RetrievalBatch: `.random` shapes, the layout contract, device moves and validation."""

from __future__ import annotations

import pytest
import torch

from gr_models.data.utils import FeatureConfig, RankingBatch, RetrievalBatch

USER_VOCAB, ITEM_VOCAB, ACTION_VOCAB = 1000, 1000, 10


def _seed_feature_configs(item_max_len: int = 180, jagged: bool = True) -> list[FeatureConfig]:
    return [
        FeatureConfig(["user_feat0"], [USER_VOCAB], 10, True),
        FeatureConfig(["user_feat1"], [USER_VOCAB], 10, True),
        FeatureConfig(["item_feat", "act_feat"], [ITEM_VOCAB, ACTION_VOCAB], item_max_len, jagged),
    ]


def _random_ranking(batch_size=128, max_num_candidates=20, num_tasks=1, **kwargs) -> RankingBatch:
    return RankingBatch.random(
        batch_size=batch_size,
        feature_configs=kwargs.pop("feature_configs", _seed_feature_configs()),
        item_feature_name="item_feat",
        contextual_feature_names=["user_feat0", "user_feat1"],
        action_feature_name="act_feat",
        max_num_candidates=max_num_candidates,
        device=torch.device("cpu"),
        num_tasks=num_tasks,
        **kwargs,
    )


def test_random_ranking_batch_matches_seed_call_and_layout():
    batch = _random_ranking(generator=torch.Generator().manual_seed(0))
    kjt = batch.features
    assert kjt.keys() == ["user_feat0", "user_feat1", "item_feat", "act_feat"]
    assert kjt.stride() == batch.batch_size == 128
    for name in ("user_feat0", "user_feat1"):
        lengths = kjt[name].lengths()
        assert lengths.min() >= 1 and lengths.max() <= 10
        assert kjt[name].values().max() < USER_VOCAB and kjt[name].values().min() >= 0
    item_lengths, action_lengths = kjt["item_feat"].lengths(), kjt["act_feat"].lengths()
    assert torch.equal(item_lengths, action_lengths)
    assert item_lengths.max() <= 180
    assert batch.num_candidates is not None and batch.num_candidates.shape == (128,)
    assert batch.num_candidates.min() >= 1 and batch.num_candidates.max() <= 20
    assert (batch.history_lengths() >= 1).all()
    assert batch.labels.shape == (int(batch.num_candidates.sum()), 1)
    assert batch.labels.dtype == torch.float32
    assert set(batch.labels.unique().tolist()) == {0.0, 1.0}
    assert batch.feature_to_max_seqlen == {"user_feat0": 10, "user_feat1": 10, "item_feat": 180, "act_feat": 180}
    assert kjt["act_feat"].values().max() < ACTION_VOCAB


def test_candidate_actions_are_label_bitmasks_in_user_order():
    batch = _random_ranking(batch_size=9, num_tasks=3, generator=torch.Generator().manual_seed(1))
    actions = batch.features["act_feat"].to_dense()
    expected_rows = []
    for b, user_actions in enumerate(actions):
        candidates = user_actions[len(user_actions) - int(batch.num_candidates[b]) :]
        expected_rows.append(torch.stack([(candidates >> t) & 1 for t in range(3)], dim=1))
    assert torch.equal(batch.labels, torch.cat(expected_rows).float())


def test_without_candidates_every_item_is_labeled():
    batch = _random_ranking(batch_size=5, max_num_candidates=0, num_tasks=2)
    assert batch.num_candidates is None and batch.max_num_candidates == 0
    assert batch.labels.shape == (int(batch.item_lengths().sum()), 2)
    bits = batch.features["act_feat"].values()
    assert torch.equal(batch.labels, torch.stack([(bits >> t) & 1 for t in range(2)], dim=1).float())


def test_fixed_length_features_and_timestamps():
    batch = _random_ranking(
        batch_size=6,
        max_num_candidates=3,
        feature_configs=_seed_feature_configs(item_max_len=12, jagged=False),
        timestamp_feature_name="ts",
        generator=torch.Generator().manual_seed(2),
    )
    assert (batch.item_lengths() == 12).all()
    timestamps = batch.features["ts"]
    assert torch.equal(timestamps.lengths(), batch.item_lengths())
    assert batch.feature_to_max_seqlen["ts"] == 12
    dense = timestamps.to_dense()
    for user in dense:
        assert (user[1:] >= user[:-1]).all()


def test_random_is_deterministic_under_a_generator():
    a = _random_ranking(batch_size=7, generator=torch.Generator().manual_seed(5))
    b = _random_ranking(batch_size=7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.features.values(), b.features.values())
    assert torch.equal(a.labels, b.labels)


def test_retrieval_random_batch():
    batch = RetrievalBatch.random(
        batch_size=16,
        feature_configs=[FeatureConfig(["item"], [50], 30, True)],
        item_feature_name="item",
        contextual_feature_names=[],
        max_num_candidates=1,
    )
    assert batch.num_candidates is not None and (batch.num_candidates == 1).all()
    assert (batch.history_lengths() >= 1).all()
    assert batch.features.keys() == ["item"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_tasks": 4}, "2\\*\\*4 = 16"),
        ({"max_num_candidates": 180}, "at least one history item"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_random_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _random_ranking(**kwargs)


def test_random_rejects_action_outside_item_group_and_stray_features():
    configs = [FeatureConfig(["item"], [10], 8), FeatureConfig(["act"], [4], 8)]
    with pytest.raises(ValueError, match="same FeatureConfig"):
        RankingBatch.random(4, configs, "item", [], "act", 2)
    with pytest.raises(ValueError, match="neither contextual"):
        RankingBatch.random(4, configs, "item", [], None, 2)
    with pytest.raises(ValueError, match="max_item_ids"):
        FeatureConfig(["a", "b"], [3], 4)


def test_batch_constructor_checks_names_and_shapes():
    batch = _random_ranking(batch_size=4)
    with pytest.raises(ValueError, match="not keys of the KJT"):
        RankingBatch(
            features=batch.features,
            batch_size=4,
            feature_to_max_seqlen=batch.feature_to_max_seqlen,
            item_feature_name="missing",
        )
    with pytest.raises(ValueError, match="num_candidates must have shape"):
        RankingBatch(
            features=batch.features,
            batch_size=4,
            feature_to_max_seqlen=batch.feature_to_max_seqlen,
            item_feature_name="item_feat",
            max_num_candidates=2,
            num_candidates=torch.ones(3, dtype=torch.long),
        )


def test_to_moves_every_tensor_and_keeps_fields():
    batch = _random_ranking(batch_size=4)
    moved = batch.to(torch.device("meta"))
    assert moved.features.values().device.type == "meta"
    assert moved.features.lengths().device.type == "meta"
    assert moved.labels.device.type == "meta" and moved.num_candidates.device.type == "meta"
    assert moved.item_feature_name == "item_feat" and moved.batch_size == 4
    assert batch.features.values().device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs an accelerator build of torch")
def test_pin_memory_pins_every_tensor():
    pinned = _random_ranking(batch_size=4).pin_memory()
    assert pinned.features.values().is_pinned() and pinned.features.lengths().is_pinned()
    assert pinned.labels.is_pinned() and pinned.num_candidates.is_pinned()


@pytest.mark.gpu
def test_to_cuda_roundtrip():
    batch = _random_ranking(batch_size=4)
    on_gpu = batch.pin_memory().to("cuda", non_blocking=True)
    assert on_gpu.features.values().is_cuda and on_gpu.labels.is_cuda
    assert torch.equal(on_gpu.features.values().cpu(), batch.features.values())
