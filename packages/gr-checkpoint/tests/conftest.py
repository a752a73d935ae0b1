"""Launching worker scripts as the ranks of a gloo world, with torchrun's environment variables."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

RankLauncher = Callable[..., None]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(script: Path, world_size: int, *args: str, timeout_s: float = 180.0) -> None:
    """Run ``python script *args`` as ranks ``0..world_size-1`` on CPU; fail with every rank's output."""
    port = _free_port()
    processes = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            CUDA_VISIBLE_DEVICES="",
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, str(script), *args],
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
    failed = [(rank, p.returncode, out) for rank, (p, out) in enumerate(zip(processes, outputs)) if p.returncode]
    assert not failed, "\n".join(f"rank {rank} exited with {code}:\n{out}" for rank, code, out in failed)


@pytest.fixture
def run_ranks() -> RankLauncher:
    return _run_ranks
