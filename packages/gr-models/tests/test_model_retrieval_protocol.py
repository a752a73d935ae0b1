"""The MovieLens retrieval protocol: tie orders, leave-last-out splits, the catalogue, and its metrics against a
brute-force ranking after a few training steps of a tiny model under every protocol variant."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gr_models.configs import PositionEncodingConfig, RetrievalConfig, ShardedEmbeddingConfig, get_hstu_config
from gr_models.data.collate import BatchCollator
from gr_models.model import RetrievalGR
from gr_models.model.retrieval_protocol import RetrievalProtocol, evaluate_retrieval, movielens_splits


def _write(root: Path, ratings: list[tuple[int, int, int, int]], movies: list[int]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ratings))
    (root / "movies.dat").write_text("".join(f"{m}::Movie {m} (2000)::Drama\n" for m in movies), encoding="latin-1")
    return root


def _items(dataset, index: int) -> list[int]:
    sample = dataset[index]
    return sample.sequence["item_id"].tolist()


def test_tie_order_and_leave_last_out_splits(tmp_path: Path) -> None:
    # user 1 rates 9 and then 2 in the same second (file order); user 2 has three ratings
    ratings = [(1, 5, 4, 100), (1, 7, 3, 200), (1, 3, 5, 150), (1, 9, 1, 300), (1, 2, 2, 300), (2, 4, 5, 10),
               (2, 6, 5, 20), (2, 8, 5, 30)]  # fmt: skip
    root = _write(tmp_path / "ml", ratings, movies=list(range(1, 11)))
    by_file = movielens_splits(root, RetrievalProtocol(tie_order="file", max_sequence_length=10))
    assert _items(by_file.test, 0) == [5, 3, 7, 9, 2]  # history, then the last rating as the target
    assert by_file.test[0].num_candidates == 1
    assert _items(by_file.valid, 0) == [5, 3, 7, 9]  # the second-to-last rating is the validation target
    assert _items(by_file.train, 0) == [5, 3, 7]  # training sees neither held-out rating
    by_item = movielens_splits(root, RetrievalProtocol(tie_order="item", max_sequence_length=10))
    assert _items(by_item.test, 0) == [5, 3, 7, 2, 9]
    no_validation = movielens_splits(root, RetrievalProtocol(validation=False, max_sequence_length=10))
    assert no_validation.valid is None and _items(no_validation.train, 0) == [5, 3, 7, 9]
    short = movielens_splits(root, RetrievalProtocol(max_sequence_length=3))
    assert _items(short.test, 0) == [7, 9, 2] and _items(short.train, 0) == [5, 3, 7]
    assert _items(by_file.valid, 1) == [4, 6]
    assert len(by_file.train) == 1  # user 2 keeps one training event: no (event, next item) pair, skipped


def test_catalogue_is_movies_file_and_rated_ids(tmp_path: Path) -> None:
    root = _write(tmp_path / "ml", [(1, 1, 4, 1), (1, 12, 4, 2), (1, 2, 4, 3)], movies=[1, 2, 3, 5])
    splits = movielens_splits(root, RetrievalProtocol(validation=False))
    assert splits.excluded_items.shape == (13,)
    assert sorted(torch.nonzero(~splits.excluded_items).squeeze(1).tolist()) == [1, 2, 3, 5, 12]
    with pytest.raises(ValueError, match="tie_order"):
        RetrievalProtocol(tie_order="random")  # type: ignore[arg-type]


def _random_ratings(seed: int) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, 25):
        count = int(rng.integers(4, 16))
        items = rng.choice(np.arange(1, 40), size=count, replace=False)
        times = np.sort(rng.integers(0, 8, size=count)) * 1000  # many same-second ratings
        rows += [(user, int(i), int(rng.integers(1, 6)), int(t)) for i, t in zip(items, times)]
    order = rng.permutation(len(rows))
    return [rows[k] for k in order]


def _tiny_model(vocab: int, filter_seen: bool) -> RetrievalGR:
    hstu = get_hstu_config(
        8, 8, 1, 1, kernel_backend="pytorch", position_encoding=PositionEncodingConfig(
            num_position_buckets=16, count_from="start", scale_embeddings=True)
    )  # fmt: skip
    table = ShardedEmbeddingConfig(feature_names=["item_id"], table_name="item_id_table", vocab_size=vocab, dim=8)
    task = RetrievalConfig(embedding_configs=[table], num_negatives=8, eval_exclude_history=filter_seen)
    return RetrievalGR(hstu, task, "cpu")


def _brute_force(model: RetrievalGR, dataset, excluded: torch.Tensor, filter_seen: bool, ks) -> dict[str, float]:
    """Ranks counted item by item in Python from the unfiltered scores."""
    model.eval()
    samples = [dataset[i] for i in range(len(dataset))]
    result = model.evaluate_batch(BatchCollator(dataset.schema)(samples))
    ranks = []
    for row, sample in enumerate(samples):
        items = sample.sequence["item_id"].tolist()
        target, seen = items[-1], set(items[:-1])
        scores = result["scores"][row].tolist()
        ahead = 0
        for item, score in enumerate(scores):
            if item == target or bool(excluded[item]) or (filter_seen and item in seen):
                continue
            ahead += score >= scores[target]
        ranks.append(ahead)
    out = {f"hr@{k}": float(np.mean([r < k for r in ranks])) for k in ks}
    out |= {f"ndcg@{k}": float(np.mean([(r < k) / math.log2(r + 2) for r in ranks])) for k in ks}
    return out | {"mrr": float(np.mean([1 / (r + 1) for r in ranks]))}


@pytest.mark.parametrize(
    ("tie_order", "validation", "filter_seen"), list(itertools.product(["file", "item"], [True, False], [True, False]))
)
def test_each_protocol_trains_and_its_metrics_match_brute_force(
    tmp_path: Path, tie_order: str, validation: bool, filter_seen: bool
) -> None:
    root = _write(tmp_path / "ml", _random_ratings(0), movies=[m for m in range(1, 45) if m % 7])
    protocol = RetrievalProtocol(
        tie_order=tie_order, validation=validation, filter_seen=filter_seen, max_sequence_length=12, top_k=(1, 5, 20)
    )  # type: ignore[arg-type]
    splits = movielens_splits(root, protocol)
    torch.manual_seed(0)
    model = _tiny_model(splits.test.schema.vocab_sizes["item_id"], filter_seen)
    dense = torch.optim.Adam(list(model.dense_parameters()), lr=1e-2)
    sparse = list(model.sparse_optimizers().values())
    collate = BatchCollator(splits.train.schema)
    losses = []
    for _ in range(3):
        losses_per_query, _ = model(collate([splits.train[i] for i in range(len(splits.train))]))
        loss = losses_per_query.mean()
        loss.backward()
        for optimizer in (dense, *sparse):
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    for held_out in [splits.test] + ([splits.valid] if validation else []):
        metrics = evaluate_retrieval(model, held_out, protocol, splits.excluded_items, batch_size=7)
        expected = _brute_force(model, held_out, splits.excluded_items, filter_seen, protocol.top_k)
        assert metrics.keys() == expected.keys()
        for name, value in expected.items():
            assert metrics[name] == pytest.approx(value, abs=1e-9), name


def test_evaluation_needs_the_model_to_filter_as_the_protocol_says(tmp_path: Path) -> None:
    root = _write(tmp_path / "ml", _random_ratings(1), movies=list(range(1, 45)))
    protocol = RetrievalProtocol(filter_seen=True, max_sequence_length=12)
    splits = movielens_splits(root, protocol)
    model = _tiny_model(splits.test.schema.vocab_sizes["item_id"], filter_seen=False)
    with pytest.raises(ValueError, match="filter_seen"):
        evaluate_retrieval(model, splits.test, protocol, splits.excluded_items)
