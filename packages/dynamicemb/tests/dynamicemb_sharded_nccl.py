"""The sharded-equivalence scenarios on GPUs under NCCL; launch with
``torchrun --nproc_per_node 2 packages/dynamicemb/tests/dynamicemb_sharded_nccl.py``.

Runs the scenarios of ``dynamicemb_sharded_scenarios`` that need no fbgemm CUDA kernel (dynamic
tables only) with every table and batch on ``cuda:<local rank>``; prints one line per scenario and
exits non-zero if any failed on any rank. ``--backend gloo`` runs the same on CPU processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import dynamicemb_sharded_scenarios as scenarios

NCCL_SCENARIOS = [
    "equivalence_sgd_dedup_on_off_two_ranks",
    "equivalence_adam_modulo_two_ranks",
    "equivalence_rowwise_adagrad_one_rank",
    "fp16_wire_two_ranks",
    "weighted_bags_two_ranks",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    backend = parser.parse_args().backend
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    if dist.get_world_size() < 2:
        raise SystemExit("run with at least 2 processes")
    env = scenarios.Env.create(rank, tempfile.mkdtemp(), device=device)
    failures = 0
    for name in NCCL_SCENARIOS:
        start = time.perf_counter()
        try:
            getattr(scenarios, name)(env)
            if device.type == "cuda":
                torch.cuda.synchronize()
            mine = "ok"
        except Exception:
            mine = traceback.format_exc()
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            status = "ok" if all(r == "ok" for r in everyone) else "FAILED"
            print(f"{name}: {status} ({time.perf_counter() - start:.1f} s)", flush=True)
            for r, result in enumerate(everyone):
                if result != "ok":
                    print(f"  rank {r}: {result}", flush=True)
        if any(r != "ok" for r in everyone):
            failures += 1
            break
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
