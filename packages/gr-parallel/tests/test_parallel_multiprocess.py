"""Two gloo processes launched with torchrun's environment: ranks, Megatron groups, collectives, re-init."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("gr_parallel_worker.py")
WORLD_SIZE = 2


pytestmark = pytest.mark.slow  # 2-process gloo runs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(out_dir: Path, timeout_s: float = 120.0) -> list[dict]:
    port = _free_port()
    processes = []
    for rank in range(WORLD_SIZE):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(WORLD_SIZE),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            CUDA_VISIBLE_DEVICES="",
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(out_dir)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=timeout_s)[0])
        except subprocess.TimeoutExpired:
            for straggler in processes:
                straggler.kill()
            outputs.append(process.communicate()[0])
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"rank {rank} exited with {process.returncode}:\n{output}"
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def test_two_process_gloo_world(tmp_path: Path) -> None:
    observed = _run_ranks(tmp_path)

    for rank, seen in enumerate(observed):
        assert seen["backend"] == "gloo"
        assert seen["rank"] == rank
        assert seen["world_size"] == WORLD_SIZE
        assert seen["world_sum"] == 3.0

        # tensor_model_parallel_size=2: both ranks share one TP group; each is its own DP group.
        assert seen["tp2"] == {
            "tp_rank": rank,
            "tp_size": 2,
            "dp_rank": 0,
            "dp_size": 1,
            "tp_sum": 3.0,
            "dp_sum": rank + 1.0,
        }
        assert "tensor_model_parallel_size=2" in seen["resize_error"]
        assert seen["initialized_after_destroy"] is False

        # After destroy and re-init with tensor_model_parallel_size=1: one DP group of both ranks.
        assert seen["tp1"] == {"tp_rank": 0, "tp_size": 1, "dp_rank": rank, "dp_size": 2, "dp_sum": 3.0}

    assert observed[0]["seeded_draw"] == observed[1]["seeded_draw"]
