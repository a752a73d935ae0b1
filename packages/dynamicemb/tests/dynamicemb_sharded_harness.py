"""Runs the multi-process scenarios of ``dynamicemb_sharded_scenarios`` once per test session.

One spawn of ``WORLD_SIZE`` gloo processes runs every scenario in order (process startup is the
expensive part on a 2-core machine); each scenario runs on a subgroup of 1, 2 or 3 ranks. After
each scenario the ranks agree on its outcome; at the first failure they stop, and the scenarios
not run are reported as such. Tests read the outcome of their scenario with :func:`outcome`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 3
TIMEOUT_S = 420
COLLECTIVE_TIMEOUT_S = 30  # a rank that failed alone frees the others' collectives after this


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, folder: str, names: list[str], verbose: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    import dynamicemb_sharded_scenarios as scenarios

    env = scenarios.Env.create(rank, os.path.join(folder, "work"))
    results: dict[str, str] = {}
    out = os.path.join(folder, f"rank{rank}.json")
    for name in names:
        start = time.monotonic()
        try:
            getattr(scenarios, name)(env)
            mine = "ok"
        except Exception:
            mine = traceback.format_exc()
        if verbose:
            print(f"rank {rank} {name}: {time.monotonic() - start:.1f}s {mine}", flush=True)
        everyone: list[Any] = [None] * WORLD_SIZE
        dist.all_gather_object(everyone, mine)
        failed = [r for r, result in enumerate(everyone) if result != "ok"]
        results[name] = mine if mine != "ok" or not failed else f"failed on rank(s) {failed}"
        with open(out, "w") as f:
            json.dump(results, f)
        if failed:
            break
    dist.destroy_process_group()


@functools.cache
def _run(names: tuple[str, ...]) -> tuple[dict[str, str], ...]:
    folder = tempfile.mkdtemp(prefix="dynamicemb-sharded-")
    context = mp.get_context("spawn")
    port = _free_port()
    processes = [context.Process(target=_worker, args=(rank, port, folder, list(names))) for rank in range(WORLD_SIZE)]
    for p in processes:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()
    results = []
    for rank in range(WORLD_SIZE):
        path = os.path.join(folder, f"rank{rank}.json")
        if not os.path.exists(path):
            results.append({})
            continue
        with open(path) as f:
            results.append(json.load(f))
    shutil.rmtree(folder, ignore_errors=True)
    return tuple(results)


def outcome(name: str) -> None:
    """Assert that scenario ``name`` passed on every rank (running all scenarios on first use)."""
    import dynamicemb_sharded_scenarios as scenarios

    results = _run(tuple(scenarios.SCENARIOS))
    problems = []
    for rank, per_rank in enumerate(results):
        result = per_rank.get(name)
        if result is None:
            problems.append(f"rank {rank}: not run (an earlier scenario failed, or the run timed out)")
        elif result != "ok":
            problems.append(f"rank {rank}: {result}")
    assert not problems, f"scenario {name}:\n" + "\n".join(problems)
