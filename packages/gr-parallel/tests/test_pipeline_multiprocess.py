"""The overlap pipeline on 2 gloo processes with a row-wise sharded static table and a sharded dynamic
table: the same losses and updated parameters as the plain loop, bit for bit, with every sharded
module's first call per step served by an input distribution started one step ahead."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the launcher lives beside this file
from gr_parallel_launch import run_ranks

WORKER = Path(__file__).with_name("pipeline_worker.py")
STEPS, SHARDED_MODULES = 4, 2


pytestmark = pytest.mark.slow  # 2-process gloo runs


def test_overlap_pipeline_matches_the_plain_loop_with_sharded_tables(tmp_path: Path) -> None:
    for rank, seen in enumerate(run_ranks(WORKER, 2, tmp_path)):
        plain, overlap = seen["plain"], seen["overlap"]
        assert len(plain["losses"]) == STEPS
        assert overlap["losses"] == plain["losses"], f"rank {rank}"
        assert overlap["state"] == plain["state"], f"rank {rank}"
        assert overlap["pipelined_calls"] == STEPS * SHARDED_MODULES
        assert plain["pipelined_calls"] == 0
        assert {"dynamic.item_table", "head.weight", "embedding.model_parallel.embeddings.users.weight"} <= set(
            plain["state"]
        )
        assert plain["state"]["dynamic.item_table"], f"rank {rank} holds no dynamic rows"
        assert "sparse_inputs gave the" in seen["mismatch"]
