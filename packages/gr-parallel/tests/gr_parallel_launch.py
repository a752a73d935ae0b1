"""Launch a worker script as N gloo ranks with torchrun's environment variables and collect their JSON reports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(worker: Path, world_size: int, out_dir: Path, *args: str, timeout_s: float = 240.0) -> list[dict]:
    """Run `python worker OUT_DIR *args` as ranks 0..world_size-1 on CPU; each must write `OUT_DIR/rank<R>.json`.

    A rank that fails or runs past `timeout_s` fails the calling test with every rank's output.
    """
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
                [sys.executable, str(worker), str(out_dir), *args],
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
    failed = [rank for rank, process in enumerate(processes) if process.returncode != 0]
    assert not failed, "\n".join(
        f"rank {rank} exited with {processes[rank].returncode}:\n{outputs[rank]}" for rank in failed
    )
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world_size)]


def exit_without_teardown() -> None:
    """End a worker (run as a script) with exit code 0 now, skipping interpreter teardown. Call it after the rank's
    report is written and its groups destroyed: on the 2-core CI machine teardown aborted after complete, correct
    runs ("terminate called without an active exception", exit -6, inside torch's native teardown)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
