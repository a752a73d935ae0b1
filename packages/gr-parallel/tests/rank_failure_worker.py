"""Two gloo ranks where rank 1 fails; rank 0 records how its next collectives end.

Usage: ``python rank_failure_worker.py OUT_DIR dies|hangs TIMEOUT_S`` with torchrun's environment.
``dies``: rank 1 exits abruptly; ``hangs``: rank 1 stops taking part (sleeps). Rank 0 keeps
all-reducing and writes ``OUT_DIR/rank0.json``: the error it got and after how many seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import gr_parallel


def main(out_dir: Path, failure: str, timeout_s: float) -> None:
    gr_parallel.initialize_distributed(backend="gloo")
    # The world's timeout also bounds start-up (ranks may import at different speeds), so the
    # collectives under test run on a group with the short timeout.
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    dist.barrier(group=group)
    if dist.get_rank() == 1:
        if failure == "dies":
            os._exit(3)
        time.sleep(timeout_s + 2)
        os._exit(0)
    start = time.monotonic()
    error = None
    try:
        for _ in range(10_000):
            dist.all_reduce(torch.ones(4), group=group)
            time.sleep(0.01)
    except RuntimeError as raised:
        error = str(raised)
    seen = {"error": error, "seconds": time.monotonic() - start}
    (out_dir / "rank0.json").write_text(json.dumps(seen))
    os._exit(0)  # the peer is gone: skip the process group's teardown


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]))
