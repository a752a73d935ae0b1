"""Sampled softmax against a brute-force cross-entropy, with shared and per-query negatives."""

from __future__ import annotations

import math

import pytest
import torch

from gr_models.modules.losses import sampled_softmax_loss


def _brute_force(query, positive, positive_id, negatives, negative_ids, temperature):
    logits = [float(query @ positive) / temperature]
    logits += [float(query @ n) / temperature for n, i in zip(negatives, negative_ids) if int(i) != int(positive_id)]
    return math.log(sum(math.exp(x) for x in logits)) - logits[0]


@pytest.mark.parametrize("per_query", [False, True])
def test_matches_brute_force_and_masks_false_negatives(per_query: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    n, m, d, t = 5, 7, 4, 0.5
    queries, positives = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    positive_ids = torch.randint(0, 6, (n,), generator=gen)
    shape = (n, m) if per_query else (m,)
    negative_ids = torch.randint(0, 6, shape, generator=gen)  # ids collide with positives: masked
    negatives = torch.randn(*shape, d, generator=gen)
    losses = sampled_softmax_loss(
        queries, positive_ids, positives, negative_ids, negatives, temperature=t, in_batch_negatives=False
    )
    for row in range(n):
        row_ids = negative_ids[row] if per_query else negative_ids
        row_negatives = negatives[row] if per_query else negatives
        expected = _brute_force(queries[row], positives[row], positive_ids[row], row_negatives, row_ids, t)
        assert losses[row].item() == pytest.approx(expected, rel=1e-5)


def test_per_query_negatives_must_have_one_row_per_query() -> None:
    queries = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"ids \[N, M\]"):
        sampled_softmax_loss(
            queries, torch.arange(3), torch.randn(3, 4), torch.zeros(2, 5, dtype=torch.int64), torch.randn(2, 5, 4),
            temperature=1.0, in_batch_negatives=False,
        )  # fmt: skip
