"""A DistributedModelParallel model with a dynamicemb-sharded table and a TorchRec row-wise table,
saved by 2 gloo ranks and loaded by 1: dynamic rows, static rows, every optimizer state and the
model's outputs come back."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

import gr_checkpoint

WORKER = Path(__file__).with_name("gr_checkpoint_sharded_worker.py")


@pytest.mark.slow
def test_sharded_model_saved_on_two_ranks_loads_on_one(tmp_path: Path, run_ranks: Callable[..., None]) -> None:
    run_ranks(WORKER, 2, "save", str(tmp_path))
    run_ranks(WORKER, 1, "load", str(tmp_path))

    saved = [json.loads((tmp_path / f"save.rank{rank}.json").read_text()) for rank in range(2)]
    loaded = json.loads((tmp_path / "load.rank0.json").read_text())
    manifest = gr_checkpoint.read_manifest(tmp_path / "ckpt")

    assert manifest.world_size == 2
    assert manifest.dynamic_tables == {"ec": {"item_table": gr_checkpoint.DynamicTableSpec(4, "float32")}}
    assert manifest.model_tensors["ec.embeddings.category_table.weight"].shape == (16, 4)
    assert manifest.sparse_optimizer_tensors
    assert saved[0]["outputs"] == saved[1]["outputs"] == loaded["outputs"]
    assert sorted(saved[0]["dynamic_rows"] + saved[1]["dynamic_rows"]) == sorted(loaded["dynamic_rows"])
    assert len(loaded["dynamic_rows"]) == 30  # 6 steps' batches of 5 item ids, no repeats
    assert sorted(saved[0]["static_rows"] + saved[1]["static_rows"]) == sorted(loaded["static_rows"])
    assert sorted(saved[0]["static_momentum_rows"] + saved[1]["static_momentum_rows"]) == sorted(
        loaded["static_momentum_rows"]
    )
    assert saved[0]["head_exp_avg"] == saved[1]["head_exp_avg"] == loaded["head_exp_avg"]
