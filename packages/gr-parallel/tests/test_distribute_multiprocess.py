"""``gr_parallel.distribute`` on gloo: 2 processes vs 1 process on the same global batches, and errors.

Both runs launch ``distribute_worker.py`` with torchrun's environment (``gr_parallel_launch``); the
2-process run must reproduce the 1-process run's losses and updated parameters: dense and
data-parallel weights, the model-parallel static table, and both dynamic tables' rows with their
optimizer state, whether the model is passed to ``distribute`` or shards itself when built. The
2-process run also records the errors it provoked and, last, how rank 0's collectives end when
rank 1 dies.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the launcher lives beside this file
from gr_parallel_launch import run_ranks

WORKER = Path(__file__).with_name("distribute_worker.py")
DENSE_LR, STATIC_LR, DYNAMIC_LR, GAMMA, STEPS = 0.1, 0.05, 0.02, 0.5, 3


pytestmark = pytest.mark.slow  # 2-process gloo runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    root = tmp_path_factory.mktemp("distribute")
    runs = {}
    for size in (1, 2):
        (root / f"world{size}").mkdir()
        runs[size] = run_ranks(WORKER, size, root / f"world{size}")
    return runs


def _close(got: object, expected: object) -> None:
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def _assert_same_training(seen: dict, single: dict) -> None:
    _close(seen["losses"], single["losses"])
    assert seen["dense"].keys() == single["dense"].keys()
    for name, value in single["dense"].items():
        _close(seen["dense"][name], value)
    _close(seen["static"], single["static"])
    assert seen["dynamic"].keys() == single["dynamic"].keys() == {"dyn", "mix"}
    for table, rows in single["dynamic"].items():
        assert seen["dynamic"][table].keys() == rows.keys()
        for key, row in rows.items():
            _close(seen["dynamic"][table][key], row)


def test_distribute_on_two_processes_matches_one_process_on_the_global_batch(runs: dict[int, list[dict]]) -> None:
    single = runs[1][0]["distribute"]
    assert single["sharded_paths"] == ["embedding.dynamic.dyn", "embedding.model_parallel"]
    assert single["data_parallel_paths"] == ["embedding.data_parallel"]
    assert single["sharding_types"] == dict.fromkeys(("mp", "mix", "dyn"), "row_wise")  # as constrained
    for seen in runs[2]:
        assert seen["distribute"]["sharded_paths"] == single["sharded_paths"]
        _assert_same_training(seen["distribute"], single)


def test_a_model_sharding_itself_matches_distribute(runs: dict[int, list[dict]]) -> None:
    single = runs[1][0]["distribute"]
    for seen in runs[2]:
        assert seen["in_model"]["sharded_paths"] == ["dynamic.dyn", "model_parallel"]
        assert seen["in_model"]["data_parallel_paths"] == ["data_parallel"]
        _assert_same_training(seen["in_model"], single)


def test_sharding_leaves_the_default_rng_stream_as_it_was(runs: dict[int, list[dict]]) -> None:
    # Each rank initializes its own shards (and a model sharding itself does so before building its MLP): the
    # stream after building and distributing the model must be the same on every rank and for any world size,
    # so that ranks seeded alike (tensor-parallel peers) stay in step.
    single = runs[1][0]["distribute"]["next_draws_after_sharding"]
    for seen in runs[2]:
        for variant in ("distribute", "in_model"):
            assert seen[variant]["next_draws_after_sharding"] == single, variant


def test_distribute_keeps_what_a_model_sharded_itself(runs: dict[int, list[dict]]) -> None:
    for seen in runs[2]:
        again = seen["distributed_again"]
        assert again["sharded_paths"] == ["embedding.dynamic.dyn", "embedding.model_parallel"]
        assert again["data_parallel_paths"] == ["embedding.data_parallel"]
        assert again["planned"] == []  # nothing left to shard


def test_training_moved_every_part(runs: dict[int, list[dict]]) -> None:
    single = runs[1][0]["distribute"]
    static_init = torch.arange(24 * 4, dtype=torch.float32).view(24, 4) / 100.0
    assert torch.tensor(single["static"]).ne(static_init).any()
    for table, width in (("dyn", 4 + 8), ("mix", 4 + 1)):  # embedding + Adam moments / row-wise AdaGrad sum
        rows = torch.tensor(list(single["dynamic"][table].values()))
        assert rows.shape[1] == width
        assert rows[:, :4].ne(0.1).any() and rows[:, 4:].ne(0).any()


def test_lr_scheduler_reaches_every_optimizer(runs: dict[int, list[dict]]) -> None:
    decay = GAMMA**STEPS
    for seen in [runs[1][0]["distribute"]] + [r[style] for r in runs[2] for style in ("distribute", "in_model")]:
        assert seen["dynamic_lrs_applied"] == pytest.approx({"dyn": DYNAMIC_LR * decay, "mix": STATIC_LR * decay})
        # dense SGD, the static table's TBE, the standalone dynamic table's Adam, the declared dynamic table
        assert seen["group_lrs"] == pytest.approx(
            sorted(lr * decay for lr in (DENSE_LR, STATIC_LR, DYNAMIC_LR, STATIC_LR))
        )


def test_errors_name_the_problem(runs: dict[int, list[dict]]) -> None:
    for seen in runs[2]:
        assert "trains in a world of 2 processes" in seen["replica_error"]
        assert "gr_parallel.distribute" in seen["replica_error"]
        assert seen["process_local_ok"]
        assert "differs across ranks: ranks [1] do not match rank 0" in seen["config_error"]
        assert "do not fit" in seen["budget_error"]


def test_a_rank_that_dies_ends_the_others_collectives(runs: dict[int, list[dict]]) -> None:
    """Rank 1 exits abruptly; rank 0's next all-reduce must raise (gloo: the peer's connection
    closed) well within the group's 30-second timeout, instead of waiting for it."""
    seen = runs[2][0]["peer_death"]
    assert seen["error"] is not None
    assert seen["seconds"] < 10.0, seen
