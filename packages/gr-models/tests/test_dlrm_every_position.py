"""DLRMBaseline on a batch without candidates scores every event from the user's earlier events: the same logits,
losses and table gradients as scoring each event as the one candidate of a sequence cut after it (for every event
but a user's first, which a candidate batch cannot express: it needs some history; its history bags are empty)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from gr_models.data.collate import collate_samples
from gr_models.data.sample import SequenceSample
from gr_models.data.schema import DatasetSchema
from gr_models.model import DLRMBaseline

SCHEMA = DatasetSchema(
    kind="ranking", item_feature_name="item", vocab_sizes={"user": 5, "item": 20, "genre": 4, "action": 4},
    max_sequence_length=10, contextual_feature_names=("user",), contextual_max_lengths={"user": 1},
    action_feature_name="action", side_feature_names=("genre",), max_num_candidates=1, task_names=("a", "b"),
)  # fmt: skip
EVERY_POSITION = dataclasses.replace(SCHEMA, max_num_candidates=0)


def _users(lengths: list[int], seed: int = 0) -> list[SequenceSample]:
    rng = np.random.default_rng(seed)
    return [
        SequenceSample(
            {"user": np.array([user % 5])},
            {"item": rng.integers(0, 20, n), "action": rng.integers(0, 4, n), "genre": rng.integers(0, 4, n)},
        )
        for user, n in enumerate(lengths)
    ]


def _cut_after_each_event(users: list[SequenceSample]) -> list[SequenceSample]:
    """One sample per event but each user's first: the user's events up to it, the event as the one candidate."""
    return [
        SequenceSample(u.contextual, {name: values[: t + 1] for name, values in u.sequence.items()}, num_candidates=1)
        for u in users
        for t in range(1, len(u.sequence["item"]))
    ]


def _table_gradients(model: DLRMBaseline) -> list[torch.Tensor]:
    return [bag.weight.grad.clone() for bag in model.ebc.embedding_bags.values()]


def test_every_event_is_scored_from_its_earlier_events() -> None:
    torch.manual_seed(0)
    model = DLRMBaseline(SCHEMA, 8, [16])
    lengths = [4, 1, 6, 2, 5]
    users = _users(lengths)
    later = torch.cat([torch.arange(1, n) + sum(lengths[:b]) for b, n in enumerate(lengths)])  # not a first event
    batch = collate_samples(users, EVERY_POSITION)
    assert batch.num_candidates is None
    losses, (logits, labels) = model(batch)
    assert logits.shape == (18, 2)
    losses[later].sum().backward()
    every_position = _table_gradients(model)
    model.zero_grad()
    cut_losses, (cut_logits, cut_labels) = model(collate_samples(_cut_after_each_event(users), SCHEMA))
    cut_losses.sum().backward()
    assert torch.equal(labels[later], cut_labels)
    torch.testing.assert_close(logits[later], cut_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses[later], cut_losses, rtol=1e-5, atol=1e-5)
    for got, want in zip(every_position, _table_gradients(model)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_users_first_event_has_empty_history_bags() -> None:
    model = DLRMBaseline(SCHEMA, 8, [16])
    batch = collate_samples(_users([3, 2]), EVERY_POSITION)
    pooled = model._pooled(batch)
    for name in ("history_item", "history_genre", "history_action"):
        assert pooled[name].shape == (5, 8)
        assert not pooled[name][[0, 3]].any(), name  # the first events of the two users
        assert pooled[name][[1, 2, 4]].abs().sum(dim=1).gt(0).all(), name
