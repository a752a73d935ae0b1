"""Two gloo ranks where rank 1 dies; rank 0 records how its next collectives end.

Usage: ``python rank_failure_worker.py OUT_DIR TIMEOUT_S`` with torchrun's environment. Rank 1
exits abruptly after a barrier; rank 0 keeps all-reducing on a group with timeout ``TIMEOUT_S``
and writes ``OUT_DIR/rank0.json``: the error it got and after how many seconds.
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


def main(out_dir: Path, timeout_s: float) -> None:
    gr_parallel.initialize_distributed(backend="gloo")
    # The world's timeout also bounds start-up (ranks may import at different speeds), so the
    # collectives under test run on a group of their own.
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    dist.barrier(group=group)
    if dist.get_rank() == 1:
        (out_dir / "rank1.json").write_text(json.dumps({"died": True}))
        os._exit(0)  # abruptly: no teardown, its connections just close
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
    main(Path(sys.argv[1]), float(sys.argv[2]))
