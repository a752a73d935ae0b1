"""Fixtures shared by the integration tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def torchrun(tmp_path: Path) -> Callable[..., list[dict]]:
    """``torchrun(worker, nproc, *args)`` runs ``worker OUT_DIR *args`` under ``torchrun --nproc_per_node
    nproc`` (gloo, CPU, one thread per process) in ``tmp_path`` and returns the ``OUT_DIR/rank<r>.json``
    report of every rank; a non-zero exit fails the test with the end of the processes' output."""

    def run(worker: Path, nproc: int, *args: str, timeout: int = 300) -> list[dict]:
        out = tmp_path / f"out-{nproc}"
        out.mkdir()
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", str(worker), str(out), *args,
        ]  # fmt: skip
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
        return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(nproc)]

    return run
