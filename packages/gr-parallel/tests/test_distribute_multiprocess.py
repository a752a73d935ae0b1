"""``gr_parallel.distribute`` on gloo: 2 processes vs 1 process on the same global batches, and errors.

Both runs launch ``distribute_worker.py`` with torchrun's environment (at once, to save time); the
2-process run must reproduce the 1-process run's losses and updated parameters: dense and
data-parallel weights, the model-parallel static table, and both dynamic tables' rows with their
optimizer state, whether the model is passed to ``distribute`` or shards itself when built. The
2-process run also records the errors it provoked. ``rank_failure_worker.py`` checks that a rank
that dies ends the other's collectives at once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("distribute_worker.py")
FAILURE_WORKER = Path(__file__).with_name("rank_failure_worker.py")
DENSE_LR, STATIC_LR, DYNAMIC_LR, GAMMA, STEPS = 0.1, 0.05, 0.02, 0.5, 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(out_dir: Path, world_size: int, worker: Path = WORKER, *args: str) -> list[subprocess.Popen]:
    out_dir.mkdir(exist_ok=True)
    port = _free_port()
    processes = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # fmt: skip
        command = [sys.executable, str(worker), str(out_dir), *args]
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    return processes


def _outputs(processes: list[subprocess.Popen], timeout_s: float) -> list[str]:
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=timeout_s)[0])
        except subprocess.TimeoutExpired:
            for straggler in processes:
                straggler.kill()
            outputs.append(process.communicate()[0])
    return outputs


def _finish(processes: list[subprocess.Popen], out_dir: Path, timeout_s: float = 240.0) -> list[dict]:
    outputs = _outputs(processes, timeout_s)
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"rank {rank} exited with {process.returncode}:\n{output[-6000:]}"
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(len(processes))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    root = tmp_path_factory.mktemp("distribute")
    launched = {size: _launch(root / f"world{size}", size) for size in (1, 2)}
    return {size: _finish(processes, root / f"world{size}") for size, processes in launched.items()}


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


def test_a_rank_that_dies_ends_the_others_collectives(tmp_path: Path) -> None:
    """Rank 1 exits abruptly; rank 0's next all-reduce must raise (gloo: the peer's connection
    closed), well within the group's timeout, instead of waiting for it."""
    timeout_s = 30.0
    processes = _launch(tmp_path, 2, FAILURE_WORKER, str(timeout_s))
    outputs = _outputs(processes, 120.0)
    assert processes[0].returncode == 0, outputs[0][-4000:]
    seen = json.loads((tmp_path / "rank0.json").read_text())
    assert seen["error"] is not None
    assert seen["seconds"] < 10.0, seen
