"""``gr_parallel.distribute`` on gloo: 2 processes vs 1 process on the same global batches, and errors.

Both runs launch ``distribute_worker.py`` with torchrun's environment (at once, to save time); the
2-process run must reproduce the 1-process run's losses and updated parameters: dense and
data-parallel weights, the model-parallel static table, and the dynamic table's rows with their
Adam state. The 2-process run also records the errors it provoked.
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
DYNAMIC_LR, GAMMA, STEPS = 0.02, 0.5, 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(out_dir: Path, world_size: int) -> list[subprocess.Popen]:
    out_dir.mkdir()
    port = _free_port()
    processes = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # fmt: skip
        processes.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(out_dir)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return processes


def _finish(processes: list[subprocess.Popen], out_dir: Path, timeout_s: float = 240.0) -> list[dict]:
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=timeout_s)[0])
        except subprocess.TimeoutExpired:
            for straggler in processes:
                straggler.kill()
            outputs.append(process.communicate()[0])
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


def test_two_processes_match_one_process_on_the_global_batch(runs: dict[int, list[dict]]) -> None:
    (single,) = runs[1]
    for seen in runs[2]:
        assert seen["sharded_paths"] == ["dynamic.dyn", "model_parallel"]
        assert seen["data_parallel_paths"] == ["data_parallel"]
        _close(seen["losses"], single["losses"])
        assert seen["dense"].keys() == single["dense"].keys()
        for name, value in single["dense"].items():
            _close(seen["dense"][name], value)
        _close(seen["static"], single["static"])
        assert seen["dynamic"].keys() == single["dynamic"].keys()
        for key, row in single["dynamic"].items():
            _close(seen["dynamic"][key], row)


def test_training_moved_every_part(runs: dict[int, list[dict]]) -> None:
    (single,) = runs[1]
    static_init = (torch.arange(24 * 4, dtype=torch.float32).view(24, 4) / 100.0).tolist()
    assert torch.tensor(single["static"]).ne(torch.tensor(static_init)).any()
    rows = torch.tensor(list(single["dynamic"].values()))
    assert rows.shape[1] == 12  # embedding + Adam's two moments
    assert rows[:, :4].ne(0.1).any() and rows[:, 4:].ne(0).any()


def test_lr_scheduler_reaches_every_optimizer(runs: dict[int, list[dict]]) -> None:
    expected = DYNAMIC_LR * GAMMA**STEPS
    for seen in runs[1] + runs[2]:
        assert seen["dynamic_lr_applied"] == pytest.approx(expected)
        # dense SGD, the static table's fused optimizer and the dynamic table, all decayed alike
        assert seen["group_lrs"] == pytest.approx(sorted([0.1 * GAMMA**STEPS, 0.05 * GAMMA**STEPS, expected]))


def test_errors_name_the_problem(runs: dict[int, list[dict]]) -> None:
    for seen in runs[2]:
        assert "trains in a world of 2 processes" in seen["replica_error"]
        assert "gr_parallel.distribute" in seen["replica_error"]
        assert seen["process_local_ok"]
        assert "differs across ranks: ranks [1] do not match rank 0" in seen["config_error"]
        assert "do not fit" in seen["budget_error"]
