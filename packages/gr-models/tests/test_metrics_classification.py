"""Per-task AUC / accuracy / log-loss accumulated over batches, against scikit-learn on random data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from gr_models.metrics import BinaryAccuracy, BinaryAUC, BinaryLogLoss, MultiTaskBinaryMetrics, binary_auc


def _random_tasks(seed: int, rows: int, tasks: int, ties: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(rows, tasks, generator=generator) < 0.3).double()
    logits = torch.randn(rows, tasks, generator=generator, dtype=torch.float64) + labels  # informative
    if ties:
        logits = torch.round(logits * 2) / 2  # many exact ties
    return logits, labels


@pytest.mark.parametrize("ties", [False, True])
def test_incremental_metrics_match_sklearn_across_uneven_batches(ties):
    logits, labels = _random_tasks(0, 1001, 3, ties)
    names = ["click", "like", "share"]
    metrics = MultiTaskBinaryMetrics(names)
    for chunk in torch.split(torch.arange(1001), [1, 300, 7, 493, 200]):
        metrics.update(logits[chunk], labels[chunk])
    result = metrics.compute()
    probabilities = torch.sigmoid(logits).numpy()
    for t, name in enumerate(names):
        y = labels[:, t].numpy()
        assert result[f"auc/{name}"] == pytest.approx(roc_auc_score(y, logits[:, t].numpy()), abs=1e-12)
        assert result[f"accuracy/{name}"] == pytest.approx(accuracy_score(y, probabilities[:, t] >= 0.5), abs=1e-12)
        assert result[f"logloss/{name}"] == pytest.approx(log_loss(y, probabilities[:, t], labels=[0, 1]), rel=1e-9)


def test_probability_inputs_and_one_dimensional_predictions():
    logits, labels = _random_tasks(1, 400, 1, ties=False)
    probabilities = torch.sigmoid(logits).squeeze(1)
    y = labels.squeeze(1)
    auc, accuracy, loss = (cls(1, from_logits=False) for cls in (BinaryAUC, BinaryAccuracy, BinaryLogLoss))
    for metric in (auc, accuracy, loss):
        metric.update(probabilities[:150], y[:150])
        metric.update(probabilities[150:], y[150:])
    assert auc.compute()["auc/task0"] == pytest.approx(roc_auc_score(y.numpy(), probabilities.numpy()), abs=1e-12)
    assert loss.compute()["logloss/task0"] == pytest.approx(log_loss(y.numpy(), probabilities.numpy()), rel=1e-9)
    extreme = BinaryLogLoss(1, from_logits=False)
    extreme.update(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 0.0]))
    expected = log_loss([0, 1, 0], [0.0, 1.0, 1.0])
    assert extreme.compute()["logloss/task0"] == pytest.approx(expected, rel=1e-9)
    threshold = BinaryAccuracy(1, threshold=0.8, from_logits=False)
    threshold.update(probabilities, y)
    expected = accuracy_score(y.numpy(), probabilities.numpy() >= 0.8)
    assert threshold.compute()["accuracy/task0"] == pytest.approx(expected)


def test_reset_single_class_and_shape_errors():
    metric = BinaryAUC(2)
    metric.update(torch.randn(5, 2), torch.ones(5, 2))
    assert all(math.isnan(v) for v in metric.compute().values())  # one class only: undefined
    metric.reset()
    metric.update(torch.tensor([[0.1, 0.2], [0.9, 0.1]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert metric.compute() == {"auc/task0": 1.0, "auc/task1": 1.0}
    assert math.isnan(BinaryAccuracy(1).compute()["accuracy/task0"])  # nothing seen yet
    with pytest.raises(ValueError, match=r"shape \[N, 2\]"):
        metric.update(torch.randn(4, 3), torch.ones(4, 3))
    with pytest.raises(ValueError, match="differ"):
        metric.update(torch.randn(4, 2), torch.ones(3, 2))


def test_binary_auc_equals_brute_force_pair_count():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, 60).astype(np.float64)  # heavy ties
    labels = rng.integers(0, 2, 60)
    positives, negatives = scores[labels == 1], scores[labels == 0]
    pairs = (positives[:, None] > negatives[None, :]).sum() + 0.5 * (positives[:, None] == negatives[None, :]).sum()
    expected = pairs / (len(positives) * len(negatives))
    assert binary_auc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(expected, abs=1e-12)
