"""A checkpoint of a dynamic table sharded over 2 gloo ranks (a DistributedModelParallel, fused Adam, frequency
admission) loads into a standalone DynamicEmbeddingCollection in one process: every rank's rows with their Adam
state, every rank's admission counts of keys not yet admitted (one more sighting then admits a key seen once) and
the optimizer step. Also a model whose only state is dynamic tables (an empty state dict) saves and loads."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("sharded_to_standalone_worker.py")


pytestmark = pytest.mark.slow  # 2-rank worker processes


def test_sharded_dynamic_table_loads_into_a_standalone_one(tmp_path: Path, run_ranks: Callable[..., None]) -> None:
    run_ranks(WORKER, 2, "save", str(tmp_path))
    load = subprocess.run(
        [sys.executable, str(WORKER), "load", str(tmp_path)], capture_output=True, text=True, timeout=180
    )
    assert load.returncode == 0, load.stdout[-3000:] + load.stderr[-6000:]

    saved = [json.loads((tmp_path / f"save.rank{rank}.json").read_text()) for rank in range(2)]
    loaded = json.loads((tmp_path / "load.rank0.json").read_text())
    assert sorted(saved[0]["rows"] + saved[1]["rows"]) == loaded["rows"]
    assert [row[0] for row in loaded["rows"]] == [100, 101]  # each rank's key seen twice: admitted
    assert loaded["counts"] == {**saved[0]["counts"], **saved[1]["counts"]} == {
        "200": 1, "201": 1, "300": 1, "301": 1,
    }  # fmt: skip
    assert loaded["optimizer_step"] == 2
    assert loaded["admitted_after_one_more_sighting"]
