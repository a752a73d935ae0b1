"""dynamicemb dropped into a plain TorchRec DLRM (no other package of this project needed), 2 gloo processes.

`dynamicemb_dlrm_worker.py` trains torchrec's DLRM with its product table made dynamic through the planner
constraints, dumps the dynamic table with DynamicEmbDump and reloads it with DynamicEmbLoad into a fresh model.
"""

from __future__ import annotations

from pathlib import Path

WORKER = Path(__file__).with_name("dynamicemb_dlrm_worker.py")
PRODUCT_IDS = 48  # how many distinct product ids the worker's data draws from


def test_dynamic_table_in_a_torchrec_dlrm_trains_dumps_and_reloads(torchrun) -> None:
    reports = torchrun(WORKER, 2)
    losses = reports[0]["losses"]
    assert all(report["losses"] == losses for report in reports), "ranks disagree on the global loss"
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.15, f"the loss did not fall: {first:.3f} -> {last:.3f}"
    for report in reports:
        assert report["world_size"] == 2
        assert report["sharding"] == {
            "product_table": "row_wise", "user_table": "table_wise", "category_table": "data_parallel"
        }  # fmt: skip
        assert report["dynamic_modules"] == 1
        assert report["differs_before_load"], "a fresh model already gives the trained outputs: the check is void"
        assert report["reload_equal"], "the reloaded model's outputs differ from the trained model's"
    # Every product id (40-bit ids, far beyond num_embeddings=64) got a row, each on exactly one rank.
    assert sum(report["dynamic_rows"] for report in reports) == PRODUCT_IDS
    assert "sharded_manifest.json" in reports[0]["dump_files"]
    assert sum(name.endswith(".dynamicemb") for name in reports[0]["dump_files"]) == 2
