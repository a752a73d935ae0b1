"""HR@k, NDCG@k and MRR from full-corpus scores or target ranks, against a brute-force computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gr_models.metrics import RetrievalMetrics, target_ranks


def _brute_force(scores: np.ndarray, targets: np.ndarray, ks: list[int]) -> dict[str, float]:
    hits = {k: [] for k in ks}
    gains = {k: [] for k in ks}
    reciprocal = []
    for row, target in zip(scores, targets):
        order = sorted(range(len(row)), key=lambda i: (-row[i], i != target))  # ties: others go first
        others_first = [i for i in order if i != target and row[i] >= row[target]]
        rank = len(others_first)
        reciprocal.append(1.0 / (rank + 1))
        for k in ks:
            hits[k].append(float(rank < k))
            gains[k].append(1.0 / math.log2(rank + 2) if rank < k else 0.0)
    result = {f"hr@{k}": float(np.mean(hits[k])) for k in ks}
    result.update({f"ndcg@{k}": float(np.mean(gains[k])) for k in ks})
    result["mrr"] = float(np.mean(reciprocal))
    return result


def test_incremental_retrieval_metrics_match_brute_force():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(97, 40))
    scores[:, 5] = scores[:, 6]  # some ties
    targets = rng.integers(0, 40, 97)
    scores[np.arange(97), targets] += 1.0  # a bit of signal
    ks = [1, 5, 10]
    metrics = RetrievalMetrics(ks)
    for chunk in np.array_split(np.arange(97), [13, 50, 51]):
        metrics.update(torch.from_numpy(scores[chunk]), torch.from_numpy(targets[chunk]))
    result = metrics.compute()
    expected = _brute_force(scores, targets, ks)
    assert result.keys() == expected.keys()
    for key in expected:
        assert result[key] == pytest.approx(expected[key], abs=1e-12), key


def test_ties_are_pessimistic_and_exclusion_works():
    flat = torch.zeros(3, 10)
    ranks = target_ranks(flat, torch.tensor([0, 4, 9]))
    assert ranks.tolist() == [9, 9, 9]  # identical scores never earn a hit
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7]])
    assert target_ranks(scores, torch.tensor([2])).tolist() == [2]
    exclude = torch.tensor([[False, True, True, False]])  # the target is never excluded
    assert target_ranks(scores, torch.tensor([2]), exclude).tolist() == [1]
    with pytest.raises(ValueError, match="target ids"):
        target_ranks(scores, torch.tensor([4]))


def test_update_from_ranks_and_reset():
    metrics = RetrievalMetrics([1, 10])
    metrics.update_from_ranks(torch.tensor([0, 3, 20]))
    result = metrics.compute()
    assert result["hr@1"] == pytest.approx(1 / 3) and result["hr@10"] == pytest.approx(2 / 3)
    assert result["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(5)) / 3)
    assert result["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 21) / 3)
    metrics.reset()
    assert all(math.isnan(v) for v in metrics.compute().values())
    with pytest.raises(ValueError, match="ks"):
        RetrievalMetrics([0])
