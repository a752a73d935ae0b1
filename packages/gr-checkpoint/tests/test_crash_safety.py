"""Training processes that checkpoint every step are SIGKILLed at random moments (one process with a
dynamic table; one of two gloo ranks, with a DTensor table or with DMP-sharded dynamic and static
tables): the newest complete checkpoint always loads, whole and consistent, and no half-written one
is ever picked up. Each run resumes from the previous one's
newest checkpoint, so resuming is exercised after every kill too."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

import gr_checkpoint

WORKER = Path(__file__).with_name("crash_worker.py")
SEED = int(os.environ.get("GR_CRASH_TEST_SEED", "0")) or random.randrange(1, 10**6)


pytestmark = pytest.mark.slow  # worker processes killed with SIGKILL and resumed


def _worker_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("crash_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Forker:
    """The worker process that forks training children on request."""

    def __init__(self) -> None:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert self._line() == "READY"

    def _line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def start(self, **command: object) -> int:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return json.loads(self._line())["pid"]

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def forker() -> Iterator[Forker]:
    forker = Forker()
    yield forker
    forker.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill(pid: int) -> None:
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, f"process {pid} survived SIGKILL"
        time.sleep(0.01)


def _events(root: Path, name: str) -> list[str]:
    progress = root / f"progress.{name}"
    return progress.read_text().splitlines() if progress.exists() else []


def _wait_for_the_second_save_to_begin(
    root: Path, name: str, pids: list[int], timeout_s: float = 30.0, nth: int = 2
) -> None:
    """Until the run started last has finished one save and begun the next (the ``nth``)."""
    begun = sum(event.startswith("begin") for event in _events(root, name))
    deadline = time.monotonic() + timeout_s
    while sum(event.startswith("begin") for event in _events(root, name)) < begun + nth:
        errors = [p.read_text() for p in root.glob("error.*")]
        assert not errors and all(map(_alive, pids)), f"a training process failed: {errors}"
        assert time.monotonic() < deadline, f"no new save of {name} began within {timeout_s} s"
        time.sleep(0.002)


def _inside_a_save(root: Path, name: str) -> bool:
    events = _events(root, name)
    return bool(events) and events[-1].startswith("begin")


def test_killed_while_saving_the_newest_complete_checkpoint_loads(tmp_path: Path, forker: Forker) -> None:
    worker = _worker_module()
    rng = random.Random(SEED)
    steps_seen, mid_save_kills = [], 0
    # Kills go on until 3 landed inside a save (whether one does depends on how long this machine's saves take
    # against the random delay), at most 12.
    while mid_save_kills < 3 and len(steps_seen) < 12:
        pid = forker.start(mode="single", root=str(tmp_path))
        _wait_for_the_second_save_to_begin(tmp_path, "single.0", [pid])
        time.sleep(rng.uniform(0.0, 0.1))  # a step's two saves take 0.05 to 0.2 s here
        _kill(pid)
        mid_save_kills += _inside_a_save(tmp_path, "single.0")

        latest = gr_checkpoint.latest_checkpoint(tmp_path / "steps")
        assert latest is not None, f"seed {SEED}"
        for path in (latest, tmp_path / "latest"):
            model = worker.Single()
            optimizer = torch.optim.Adam(model.head.parameters(), lr=0.01)
            extra = gr_checkpoint.load(path, model, optimizer)  # verifies every file's checksum
            digest = worker.single_digest(model)
            assert torch.equal(digest["head"], extra["head"]) and digest["rows"] == extra["rows"], f"seed {SEED}"
            assert gr_checkpoint.read_manifest(path).step == extra["step"]
        steps_seen.append(gr_checkpoint.read_manifest(latest).step)
        assert len(list((tmp_path / "steps").glob("step_*"))) <= 3  # keep_last=2, plus one killed mid-prune
    kills = len(steps_seen)
    print(f"seed {SEED}: newest complete steps {steps_seen}, {mid_save_kills} of {kills} kills inside a save")
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] >= kills, f"seed {SEED}: {steps_seen}"
    assert mid_save_kills >= 3, f"seed {SEED}: only {mid_save_kills} of {kills} kills landed inside a save"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_one_of_two_ranks_killed_while_saving(tmp_path: Path, forker: Forker) -> None:
    worker = _worker_module()
    rng = random.Random(SEED + 1)
    steps_seen, mid_save_kills = [], 0
    for _attempt in range(3):
        port, victim = _free_port(), rng.randrange(2)
        pids = [forker.start(mode="dist", root=str(tmp_path), rank=r, world_size=2, port=port) for r in range(2)]
        _wait_for_the_second_save_to_begin(tmp_path, f"dist.{victim}", pids)
        time.sleep(rng.uniform(0.0, 0.05))
        _kill(pids[victim])
        mid_save_kills += _inside_a_save(tmp_path, f"dist.{victim}")
        time.sleep(0.2)  # the survivor goes on alone until a collective fails (rank 0 then discards the staging)
        _kill(pids[1 - victim])
        for error in tmp_path.glob("error.*"):
            error.unlink()  # the survivor's failed collective, expected

        latest = gr_checkpoint.latest_checkpoint(tmp_path / "steps")
        assert latest is not None, f"seed {SEED}"
        model = torch.nn.Module()
        model.dense = torch.nn.Linear(4, 2)
        model.table = torch.nn.Parameter(torch.zeros(worker.ROWS, worker.DIM))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
        extra = gr_checkpoint.load(latest, model, optimizer)  # 2 ranks' files into one process
        assert torch.equal(model.dense.weight, extra["dense"]) and torch.equal(model.table, extra["table"])
        assert gr_checkpoint.read_manifest(latest).world_size == 2
        steps_seen.append(extra["step"])
    print(f"seed {SEED}: newest complete steps {steps_seen}, {mid_save_kills} of 3 kills inside a save")
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] >= len(steps_seen), f"seed {SEED}: {steps_seen}"
    assert mid_save_kills >= 1, f"seed {SEED}: no kill of 3 landed inside a save"
    _damaged_two_rank_checkpoint_is_named(tmp_path, forker, latest)


def _damaged_two_rank_checkpoint_is_named(root: Path, forker: Forker, latest: Path) -> None:
    """A byte flipped in a file that rank 1 verifies: both ranks raise naming it; a rank's file deleted: named."""
    records = gr_checkpoint.read_manifest(latest).files
    assert records is not None
    damaged = latest / sorted(records)[1]  # rank r of 2 verifies the sorted files r, r + 2, ...
    original = damaged.read_bytes()
    damaged.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    step = gr_checkpoint.read_manifest(latest).step
    port = _free_port()
    pids = [
        forker.start(mode="dist", root=str(root), rank=r, world_size=2, port=port, max_steps=step) for r in range(2)
    ]
    _wait_until_exited(pids)
    errors = sorted(p.read_text() for p in root.glob("error.*"))
    assert len(errors) == 2, errors
    assert all(e.startswith(f"CheckpointCorruptError: {damaged}: corrupt: CRC32") for e in errors), errors

    damaged.write_bytes(original)
    (latest / "torch_module" / "__1_0.distcp").unlink()
    model = torch.nn.Linear(4, 2)
    with pytest.raises(gr_checkpoint.CheckpointCorruptError, match=r"__1_0\.distcp: missing; .*\(written by rank 1\)"):
        gr_checkpoint.load(latest, model)


def _wait_until_exited(pids: list[int], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(map(_alive, pids)):
        assert time.monotonic() < deadline, f"processes {pids} did not exit"
        time.sleep(0.01)


def test_one_of_two_ranks_with_sharded_tables_killed_while_saving(tmp_path: Path, forker: Forker) -> None:
    """DistributedModelParallel with a dynamic table sharded by dynamicemb and a row-wise static table:
    each resumed run (2 ranks) checks what it loaded against the digest saved with it."""
    rng = random.Random(SEED + 2)
    steps_seen, mid_save_kills = [], 0
    for _attempt in range(3):
        port, victim = _free_port(), rng.randrange(2)
        pids = [forker.start(mode="sharded", root=str(tmp_path), rank=r, world_size=2, port=port) for r in range(2)]
        _wait_for_the_second_save_to_begin(tmp_path, f"sharded.{victim}", pids, timeout_s=60)
        time.sleep(rng.uniform(0.0, 0.05))
        _kill(pids[victim])
        mid_save_kills += _inside_a_save(tmp_path, f"sharded.{victim}")
        time.sleep(0.2)
        _kill(pids[1 - victim])
        for error in tmp_path.glob("error.*"):
            error.unlink()  # the survivor's failed collective, expected

        latest = gr_checkpoint.latest_checkpoint(tmp_path / "steps", verify=True)
        assert latest is not None, f"seed {SEED}"
        files = gr_checkpoint.read_manifest(latest).files or {}
        assert sum(".shard-" in name for name in files) == 2 and any("sharded_manifest" in n for n in files)
        steps_seen.append(gr_checkpoint.read_manifest(latest).step)
    # A last run only resumes from the newest checkpoint, checks it against its digest and exits.
    port = _free_port()
    pids = [
        forker.start(mode="sharded", root=str(tmp_path), rank=r, world_size=2, port=port, max_steps=steps_seen[-1])
        for r in range(2)
    ]
    _wait_until_exited(pids)
    assert not [p.read_text() for p in tmp_path.glob("error.*")]
    for rank in range(2):
        assert _events(tmp_path, f"sharded.{rank}")[-1] == f"checked-at-world-2 {steps_seen[-1]}"
    print(f"seed {SEED}: newest complete steps {steps_seen}, {mid_save_kills} of 3 kills inside a save")
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] >= len(steps_seen), f"seed {SEED}: {steps_seen}"
    assert mid_save_kills >= 1, f"seed {SEED}: no kill landed inside a save"


def test_asynchronous_saves_of_two_ranks_killed_while_writing(tmp_path: Path, forker: Forker) -> None:
    """As above with asynchronous saves (training goes on while the background threads write); finally the
    newest checkpoint is resumed by one process (DMP at world 1) and checked against its digest."""
    rng = random.Random(SEED + 3)
    steps_seen = []
    for _attempt in range(3):
        port, victim = _free_port(), rng.randrange(2)
        command = {"mode": "sharded", "root": str(tmp_path), "world_size": 2, "port": port, "asynchronous": True}
        pids = [forker.start(**command, rank=r) for r in range(2)]
        # The third save call begins after the second returned, which waited for the first to be published.
        _wait_for_the_second_save_to_begin(tmp_path, f"sharded.{victim}", pids, timeout_s=60, nth=3)
        time.sleep(rng.uniform(0.0, 0.05))
        _kill(pids[victim])
        time.sleep(0.2)
        _kill(pids[1 - victim])
        for error in tmp_path.glob("error.*"):
            error.unlink()  # the survivor's failed collective, expected

        latest = gr_checkpoint.latest_checkpoint(tmp_path / "steps", verify=True)
        assert latest is not None, f"seed {SEED}"
        steps_seen.append(gr_checkpoint.read_manifest(latest).step)
    command = {"mode": "sharded", "root": str(tmp_path), "world_size": 1, "port": _free_port(), "rank": 0}
    _wait_until_exited([forker.start(**command, max_steps=steps_seen[-1])])
    assert not [p.read_text() for p in tmp_path.glob("error.*")]
    assert _events(tmp_path, "sharded.0")[-1] == f"checked-at-world-1 {steps_seen[-1]}"
    print(f"seed {SEED}: newest complete steps {steps_seen} (asynchronous saves)")
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] >= len(steps_seen), f"seed {SEED}: {steps_seen}"
