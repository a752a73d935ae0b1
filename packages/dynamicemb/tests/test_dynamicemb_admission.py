"""Frequency admission: keys enter the table only after ``threshold`` sightings."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingConfig

from dynamicemb import (
    DynamicEmbDump,
    DynamicEmbeddingCollection,
    DynamicEmbeddingTable,
    DynamicEmbFileError,
    DynamicEmbInitializerArgs,
    DynamicEmbInitializerMode,
    DynamicEmbLoad,
    DynamicEmbOptimizerArgs,
    DynamicEmbTableOptions,
    FrequencyAdmissionStrategy,
    KVCounter,
    dynamic_embedding_lookup,
)
from dynamicemb.dump import TableFile, table_file_path
from dynamicemb.hash_index.base import DynamicEmbScoreStrategy


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


def test_kv_counter_dump_and_load_carry_the_counts() -> None:
    counter = KVCounter(capacity=64, bucket_capacity=8)
    counter.add(torch.tensor([3, 8, 40]), torch.tensor([1, 2, 5]))
    dumped = {k: c for keys, counts in counter.dump(batch_size=16) for k, c in zip(keys.tolist(), counts.tolist())}
    assert dumped == {3: 1, 8: 2, 40: 5}
    other = KVCounter(capacity=64, bucket_capacity=8)
    other.add(torch.tensor([8, 9]), torch.tensor([7, 1]))
    other.load(torch.tensor(list(dumped)), torch.tensor(list(dumped.values())))
    assert other.add(torch.tensor([3, 8, 9, 40]), torch.ones(4, dtype=torch.int64)).tolist() == [2, 3, 2, 6]


# --- dump and load -----------------------------------------------------------------------------
def _collection(threshold: int | None) -> DynamicEmbeddingCollection:
    admission = {} if threshold is None else {"admit_strategy": FrequencyAdmissionStrategy(threshold)}
    return DynamicEmbeddingCollection(
        tables=[EmbeddingConfig(name="t", embedding_dim=3, num_embeddings=128, feature_names=["f"])],
        table_options=DynamicEmbTableOptions(**admission),
    )


def _table_of(module: DynamicEmbeddingCollection) -> DynamicEmbeddingTable:
    return module.dynamic_embedding_tables()["t"]


def _counts(table: DynamicEmbeddingTable) -> dict[int, int]:
    return {k: c for keys, counts in table.counter.dump() for k, c in zip(keys.tolist(), counts.tolist())}


def _counted_and_dumped(path: str) -> DynamicEmbeddingCollection:
    module = _collection(threshold=3)
    _step(_table_of(module), [5, 5, 9])
    _step(_table_of(module), [7, 7, 7])  # 7 is admitted and leaves the counter
    DynamicEmbDump(path, module)
    return module


def test_counts_of_keys_not_yet_admitted_survive_dump_and_load(tmp_path) -> None:
    _counted_and_dumped(str(tmp_path))
    footer = TableFile.open(table_file_path(str(tmp_path), "_root", "t")).footer
    assert sum(footer["counter_chunk_rows"]) == 2
    restored = _collection(threshold=3)
    DynamicEmbLoad(str(tmp_path), restored)
    table = _table_of(restored)
    assert _counts(table) == {5: 2, 9: 1}
    _step(table, [5, 9])  # 5 reaches its third sighting, 9 its second
    assert table.store.contains(torch.tensor([5, 9, 7])).tolist() == [True, False, True]
    plain = _collection(threshold=None)  # a table without admission ignores the counts
    DynamicEmbLoad(str(tmp_path), plain)
    assert _table_of(plain).store.contains(torch.tensor([5, 9, 7])).tolist() == [False, False, True]


def _strip_counters_to_version_1(path: str) -> None:
    """Rewrite a dump as the version-1 format wrote it: rows only, no counter chunks."""
    data = Path(path).read_bytes()
    footer_len = int.from_bytes(data[-16:-8], "little")
    footer = json.loads(data[-16 - footer_len : -16])
    rows = data[8 : -16 - footer_len - 16 * sum(footer.pop("counter_chunk_rows"))]
    del footer["cached_rows"]
    footer.update(format_version=1, crc32=zlib.crc32(rows))
    encoded = json.dumps(footer).encode()
    Path(path).write_bytes(data[:8] + rows + encoded + len(encoded).to_bytes(8, "little") + data[-8:])


def test_a_dump_without_counters_loads_and_counting_starts_over(tmp_path) -> None:
    _counted_and_dumped(str(tmp_path))
    _strip_counters_to_version_1(table_file_path(str(tmp_path), "_root", "t"))
    restored = _collection(threshold=3)
    DynamicEmbLoad(str(tmp_path), restored)
    table = _table_of(restored)
    assert table.counter.size() == 0 and table.store.contains(torch.tensor([7])).tolist() == [True]
    _step(table, [5, 5])
    assert table.size() == 1  # 5 was counted from zero: two sightings are not enough
    _step(table, [5])
    assert table.size() == 2


def test_corrupt_counter_chunk_rows_fail_naming_the_file(tmp_path) -> None:
    _counted_and_dumped(str(tmp_path))
    path = table_file_path(str(tmp_path), "_root", "t")
    data = Path(path).read_bytes()
    Path(path).write_bytes(data.replace(b'"counter_chunk_rows": [2]', b'"counter_chunk_rows": [3]'))
    with pytest.raises(DynamicEmbFileError, match=r"t\.dynamicemb: truncated or corrupt"):
        DynamicEmbLoad(str(tmp_path), _collection(threshold=3))
