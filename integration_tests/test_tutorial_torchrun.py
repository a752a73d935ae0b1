"""The seed-000 tutorial flow under `torchrun --nproc_per_node 1` and `2` (gloo, CPU).

`tutorial_flow_worker.py` makes the tutorial's calls at small sizes (the unchanged tutorial script takes minutes
per process on a CPU: its bfloat16 batch of 128 users has no fast CPU kernels). With one process the model stays
whole; with two, the RankingGR built inside the world comes out with its dynamic table sharded over both ranks
(its model-parallel tables use Adam, which fbgemm's CPU TBE lacks, so they are kept data-parallel with a
warning), trains data-parallel, and gr_checkpoint saves and restores it collectively after destroy_global_state().
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("tutorial_flow_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(nproc: int, tmp_path: Path) -> list[dict]:
    out = tmp_path / "out"
    out.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", str(WORKER), str(out),
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(nproc)]


@pytest.mark.parametrize("nproc", [1, 2])
def test_tutorial_flow_under_torchrun(nproc: int, tmp_path: Path) -> None:
    reports = _torchrun(nproc, tmp_path)
    for report in reports:
        assert report["world_size"] == nproc
        assert report["loss_finite"]
        assert report["manifest_world_size"] == nproc
        assert report["zeroing_changed_outputs"] and report["load_restored_outputs"]
    tables = {"user_table0", "user_table1", "act", "item"}
    if nproc == 1:
        assert reports[0]["placement"] == dict.fromkeys(tables, "local")
    else:
        expected = {**dict.fromkeys(tables, "replicated"), "item": "sharded"}
        assert all(report["placement"] == expected for report in reports)
    checkpoint = tmp_path / "checkpoint"
    assert (checkpoint / "manifest.json").is_file() and (checkpoint / "dynamicemb_module").is_dir()
