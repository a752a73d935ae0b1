"""Frequency admission: keys enter the table only after ``threshold`` sightings."""

from __future__ import annotations

import torch

from dynamicemb import (
    DynamicEmbeddingTable,
    DynamicEmbInitializerArgs,
    DynamicEmbInitializerMode,
    DynamicEmbOptimizerArgs,
    DynamicEmbTableOptions,
    FrequencyAdmissionStrategy,
    KVCounter,
    dynamic_embedding_lookup,
)
from dynamicemb.table.base import DynamicEmbScoreStrategy


def _table(threshold: int, rejected: DynamicEmbInitializerArgs | None = None, counter=None) -> DynamicEmbeddingTable:
    return DynamicEmbeddingTable(
        name="t",
        dim=3,
        num_embeddings=128,
        options=DynamicEmbTableOptions(
            initializer_args=DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.CONSTANT, value=1.0),
            admit_strategy=FrequencyAdmissionStrategy(threshold, rejected),
            admission_counter=counter,
        ),
        optimizer=DynamicEmbOptimizerArgs(learning_rate=0.5),
    )


def _step(table: DynamicEmbeddingTable, ids: list[int]) -> torch.Tensor:
    out = dynamic_embedding_lookup(table, torch.tensor(ids), training=True)
    out.sum().backward()
    return out.detach()


def test_keys_are_admitted_at_the_threshold_counting_duplicates() -> None:
    table = _table(3, rejected=DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.CONSTANT, value=-7.0))
    out = _step(table, [5, 5, 9])  # 5 seen twice, 9 once: neither admitted
    assert table.size() == 0
    torch.testing.assert_close(out, torch.full((3, 3), -7.0))  # not-admitted keys get the strategy's values
    out = _step(table, [5, 9])  # 5 reaches 3 sightings
    assert table.store.contains(torch.tensor([5, 9])).tolist() == [True, False]
    torch.testing.assert_close(out[0], torch.ones(3))  # admitted: the table's initializer
    torch.testing.assert_close(out[1], torch.full((3,), -7.0))
    out = _step(table, [5, 9, 9])  # 5 was updated by SGD (1 - 0.5), 9 reaches 4 sightings
    torch.testing.assert_close(out[0], torch.full((3,), 0.5))
    assert table.size() == 2
    torch.testing.assert_close(out[1], torch.ones(3))
    assert table.counter.size() == 0  # admitted keys leave the counter


def test_keys_not_admitted_get_no_update_and_default_to_the_table_initializer() -> None:
    table = _table(10)
    first = _step(table, [1, 2])
    second = _step(table, [1, 2])
    torch.testing.assert_close(first, torch.ones(2, 3))
    torch.testing.assert_close(second, torch.ones(2, 3))
    assert table.size() == 0


def test_eval_lookups_do_not_count() -> None:
    table = _table(2)
    dynamic_embedding_lookup(table, torch.tensor([4, 4, 4]), training=False)
    _step(table, [4])
    assert table.size() == 0


def test_kv_counter_accumulates_and_forgets_the_lowest_count_when_full() -> None:
    counter = KVCounter(capacity=8, bucket_capacity=8)
    assert counter.add(torch.arange(8), torch.arange(1, 9)).tolist() == list(range(1, 9))
    assert counter.add(torch.tensor([3]), torch.tensor([10])).tolist() == [14]
    counter.add(torch.tensor([100]), torch.tensor([5]))  # full bucket: key 0 (count 1) is forgotten
    assert counter.index.find(torch.tensor([0, 100]))[1].tolist() == [False, True]
    counter.erase(torch.tensor([100]))
    assert counter.size() == 7
    assert counter.index.score_strategy is DynamicEmbScoreStrategy.CUSTOMIZED


def test_a_user_counter_is_used() -> None:
    counter = KVCounter(capacity=64)
    table = _table(2, counter=counter)
    _step(table, [7])
    assert table.counter is counter and counter.size() == 1
