"""Deterministic mode (issue 21): the same bits run to run and for any order of duplicate ids.

Two trainings see the same batches, the second with every batch shuffled (each id keeps its own
gradient weight), on a table small enough to evict; in deterministic mode the stored keys, slots,
embeddings, optimizer states and scores must be bit-identical. CPU: the torch index and the Triton
index under the interpreter (tiny sizes); GPU (``-m gpu``): the Triton index on CUDA at larger sizes,
twice in the same order and once shuffled. With an admission strategy, the admission counter's index
(:class:`~dynamicemb.admission.KVCounter`) follows the same switch: the admitted keys and the counter's
keys, slots and counts must be bit-identical too.
"""

from __future__ import annotations

import pytest
import torch

from dynamicemb import (
    DynamicEmbeddingTable,
    DynamicEmbInitializerArgs,
    DynamicEmbInitializerMode,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbTableOptions,
    FrequencyAdmissionStrategy,
    KVCounter,
    dynamic_embedding_lookup,
)
from dynamicemb.deterministic import ordered_segment_sum
from dynamicemb.hash_index import DynamicEmbScoreStrategy, create_hash_table
from dynamicemb.pooling import pool_bags


def _table(device: torch.device, backend: str, strategy: DynamicEmbScoreStrategy, deterministic: bool, size: int):
    options = DynamicEmbTableOptions(
        initializer_args=DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.NORMAL, std_dev=0.05),
        max_capacity=size,
        bucket_capacity=16,
        score_strategy=strategy,
        deterministic=deterministic,
        global_hbm_for_values=1 << 30,
    )
    optimizer = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=0.01)
    table = DynamicEmbeddingTable(
        name="t", dim=8, num_embeddings=size, options=options, optimizer=optimizer, device=device, hash_backend=backend
    )
    if strategy == DynamicEmbScoreStrategy.CUSTOMIZED:
        table.set_score(7)
    return table


def _batches(device: torch.device, steps: int, ids: int, distinct: int, dim: int) -> list[tuple]:
    """``(ids [ids], weights [ids, dim])`` per step: few distinct ids, so most occur several times."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        batch = torch.randint(0, distinct, (ids,), generator=g) * 7919 - 1000
        weights = torch.randn(ids, dim, generator=g) * torch.logspace(-3, 3, ids).unsqueeze(1)
        out.append((batch.to(device), weights.to(device)))
    return out


def _train(table: DynamicEmbeddingTable, batches: list[tuple], shuffle_seed: int | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the initializer's draws for new keys
    if table.device.type == "cuda":
        torch.cuda.manual_seed(0)
    for step, (ids, weights) in enumerate(batches):
        if shuffle_seed is not None:
            order = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(shuffle_seed + step))
            ids, weights = ids[order.to(ids.device)], weights[order.to(ids.device)]
        (dynamic_embedding_lookup(table, ids, training=True) * weights).sum().backward()
    keys, slots, scores = table.store.index.export_batch(0, table.store.index.capacity)
    values = table.store.values.read(slots)
    return {"keys": keys, "slots": slots, "scores": scores, "values": values}


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], strategy) -> None:
    for name in a:
        if name == "scores" and strategy == DynamicEmbScoreStrategy.TIMESTAMP:
            continue  # wall-clock nanoseconds: only their order is the same from run to run
        assert torch.equal(a[name], b[name]), f"{name} differ between the two runs"


STRATEGIES = [
    DynamicEmbScoreStrategy.TIMESTAMP,
    DynamicEmbScoreStrategy.STEP,
    DynamicEmbScoreStrategy.LFU,
    DynamicEmbScoreStrategy.CUSTOMIZED,
]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shuffled_duplicates_give_identical_tables(backend: str, strategy: DynamicEmbScoreStrategy) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    cpu = torch.device("cpu")
    batches = _batches(cpu, steps=3, ids=96, distinct=90, dim=8)
    first = _train(_table(cpu, backend, strategy, True, 64), batches, shuffle_seed=None)
    second = _train(_table(cpu, backend, strategy, True, 64), batches, shuffle_seed=10)
    seen = torch.cat([ids for ids, _ in batches]).unique().numel()
    assert 0 < first["keys"].numel() < seen, "the table should have evicted or refused keys"
    _assert_identical(first, second, strategy)


def test_the_shuffle_changes_index_add_sums() -> None:
    """The test above is sensitive: without deterministic mode the shuffled training differs."""
    cpu = torch.device("cpu")
    batches = _batches(cpu, steps=3, ids=96, distinct=60, dim=8)
    strategy = DynamicEmbScoreStrategy.TIMESTAMP
    first = _train(_table(cpu, "torch", strategy, False, 64), batches, shuffle_seed=None)
    second = _train(_table(cpu, "torch", strategy, False, 64), batches, shuffle_seed=10)
    assert torch.equal(first["keys"], second["keys"])
    assert not torch.equal(first["values"], second["values"])


def test_option_none_follows_torch() -> None:
    table = _table(torch.device("cpu"), "torch", DynamicEmbScoreStrategy.TIMESTAMP, None, 64)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert table.deterministic is True
        torch.use_deterministic_algorithms(False)
        assert table.deterministic is False
    finally:
        torch.use_deterministic_algorithms(before)
    assert _table(torch.device("cpu"), "torch", DynamicEmbScoreStrategy.TIMESTAMP, True, 64).deterministic is True


def test_ordered_segment_sum_ignores_row_order() -> None:
    g = torch.Generator().manual_seed(0)
    segments = torch.randint(0, 9, (300,), generator=g)
    values = torch.randn(300, 5, generator=g) * torch.logspace(-6, 6, 300).unsqueeze(1)
    _, inverse, counts = torch.unique(segments, return_inverse=True, return_counts=True)
    expected = torch.zeros(counts.numel(), 5, dtype=torch.float64).index_add_(0, inverse, values.double())
    summed = ordered_segment_sum(values, inverse, counts)
    torch.testing.assert_close(summed.double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    for seed in range(3):
        order = torch.randperm(300, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(ordered_segment_sum(values[order], inverse[order], counts), summed)


def test_deterministic_pooling_matches_index_add() -> None:
    from torchrec.modules.embedding_configs import PoolingType

    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 0, 5, 1])
    rows = torch.randn(9, 4, generator=g, requires_grad=True)
    weights = torch.rand(9, generator=g)
    for pooling in (PoolingType.SUM, PoolingType.MEAN):
        fast = pool_bags(rows, lengths, weights, pooling, deterministic=False)
        ordered = pool_bags(rows, lengths, weights, pooling, deterministic=True)
        torch.testing.assert_close(ordered, fast)
        (grad,) = torch.autograd.grad(ordered.sum(), rows)
        (expected,) = torch.autograd.grad(fast.sum(), rows)
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_index_placement_ignores_key_order(backend: str) -> None:
    """Deterministic indexes given the same keys (with duplicates) in two orders hold the same keys in
    the same slots with the same scores (LFU: refusals depend on which keys compete)."""
    if backend == "triton":
        pytest.importorskip("triton")
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 90, (120,), generator=g) for _ in range(3)]
    exported = []
    for shuffle in (False, True):
        table = create_hash_table(
            init_capacity=64,
            max_capacity=64,
            bucket_capacity=16,
            score_strategy=DynamicEmbScoreStrategy.LFU,
            backend=backend,
            deterministic=True,
        )
        for i, keys in enumerate(batches):
            if shuffle:
                keys = keys[torch.randperm(keys.numel(), generator=torch.Generator().manual_seed(i))]
            table.find_or_insert(keys)
        exported.append(table.export_batch(0, table.capacity))
    for a, b in zip(*exported):
        assert torch.equal(a, b)


def _admission_table(device: torch.device, backend: str, deterministic: bool, size: int) -> DynamicEmbeddingTable:
    """A table admitting a key at its 2nd sighting; its counter has ``size`` slots (the table's capacity)."""
    options = DynamicEmbTableOptions(
        initializer_args=DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.NORMAL, std_dev=0.05),
        max_capacity=size,
        bucket_capacity=16,
        score_strategy=DynamicEmbScoreStrategy.STEP,
        admit_strategy=FrequencyAdmissionStrategy(2),
        deterministic=deterministic,
        global_hbm_for_values=1 << 30,
    )
    optimizer = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.SGD, learning_rate=0.01)
    return DynamicEmbeddingTable(
        name="t", dim=8, num_embeddings=size, options=options, optimizer=optimizer, device=device, hash_backend=backend
    )


def _counter_state(table: DynamicEmbeddingTable) -> dict[str, torch.Tensor]:
    """The counter's keys, slots and counts in slot order, and the keys the table admitted (slot order)."""
    counter = table.counter
    assert isinstance(counter, KVCounter)
    keys, slots, _ = counter.index.export_batch(0, counter.index.capacity)
    admitted, _, _ = table.store.index.export_batch(0, table.store.index.capacity)
    return {"counted_keys": keys, "counter_slots": slots, "counts": counter.counts[slots], "admitted": admitted}


def _admission_runs(
    device: torch.device, backend: str, size: int, batches: list[tuple], shuffles: tuple
) -> dict[str, torch.Tensor]:
    """Train a fresh deterministic admission table once per entry of ``shuffles`` (a shuffle seed or
    ``None``), assert the :func:`_counter_state` of every run equals the first one's, and return it."""
    runs = []
    for shuffle in shuffles:
        table = _admission_table(device, backend, True, size)
        assert table.counter.index.deterministic is True, "the counter's index must follow the table's switch"
        _train(table, batches, shuffle_seed=shuffle)
        runs.append(_counter_state(table))
    for other in runs[1:]:
        for name in runs[0]:
            assert torch.equal(runs[0][name], other[name]), f"{name} differ between the runs"
    return runs[0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_admission_counter_ignores_the_order_of_ids(backend: str) -> None:
    """Shuffled duplicates, a counter too small for the keys it sees (full buckets forget their lowest
    counts): the same admitted keys, and the same counted keys in the same slots with the same counts."""
    if backend == "triton":
        pytest.importorskip("triton")
    cpu = torch.device("cpu")
    batches = _batches(cpu, steps=3, ids=96, distinct=90, dim=8)
    first = _admission_runs(cpu, backend, 64, batches, shuffles=(None, 10, 20))
    seen = torch.cat([ids for ids, _ in batches]).unique().numel()
    admitted, counted = first["admitted"].numel(), first["counted_keys"].numel()
    assert 0 < admitted < seen, "some keys should be admitted, not all"
    assert counted > 0 and admitted + counted < seen, "the counter should hold keys and have forgotten some"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kv_counter_ignores_the_order_of_keys(backend: str) -> None:
    """A deterministic counter given the same unique keys and increments in different orders (tied
    counts competing for full buckets) keeps the same keys in the same slots with the same counts."""
    if backend == "triton":
        pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    calls = [(torch.randperm(200, generator=g)[:80] * 13, torch.randint(1, 3, (80,), generator=g)) for _ in range(3)]
    states = []
    for shuffle in (None, 1, 2):
        counter = KVCounter(32, 16, backend=backend, deterministic=True)
        accumulated = []
        for i, (keys, increments) in enumerate(calls):
            order = torch.arange(80)
            if shuffle is not None:
                order = torch.randperm(80, generator=torch.Generator().manual_seed(shuffle + i))
            back = torch.empty_like(order)
            back[order] = torch.arange(80)
            accumulated.append(counter.add(keys[order], increments[order])[back])
        keys, slots, _ = counter.index.export_batch(0, counter.index.capacity)
        states.append((keys, slots, counter.counts[slots], torch.cat(accumulated)))
    assert states[0][0].numel() == 32, "the counter should be full"
    for other in states[1:]:
        for a, b in zip(states[0], other):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_cuda_admission_counter_runs_are_bit_identical() -> None:
    cuda = torch.device("cuda")
    batches = _batches(cuda, steps=4, ids=200_000, distinct=150_000, dim=8)  # 150K keys, a 64K-slot counter
    first = _admission_runs(cuda, "auto", 1 << 16, batches, shuffles=(None, None, 10))
    assert first["admitted"].numel() > 0 and first["counted_keys"].numel() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
def test_cuda_runs_are_bit_identical(strategy: DynamicEmbScoreStrategy) -> None:
    cuda = torch.device("cuda")
    batches = _batches(cuda, steps=4, ids=200_000, distinct=90_000, dim=8)  # 90K keys into 64K slots
    runs = [
        _train(_table(cuda, "auto", strategy, True, 1 << 16), batches, shuffle_seed=shuffle)
        for shuffle in (None, None, 10)
    ]
    seen = torch.cat([ids for ids, _ in batches]).unique().numel()
    assert 0 < runs[0]["keys"].numel() < seen, "the table should have evicted or refused keys"
    _assert_identical(runs[0], runs[1], strategy)
    _assert_identical(runs[0], runs[2], strategy)
