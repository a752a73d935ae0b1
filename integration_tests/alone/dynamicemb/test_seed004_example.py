"""The seed-004 example (dynamicemb's introduction), its code unchanged, under torchrun with 1 and 2 processes."""

from __future__ import annotations

from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("seed004_example.py")


@pytest.mark.parametrize("nproc", [1, 2])
def test_seed004_example_under_torchrun(torchrun, nproc: int) -> None:
    reports = torchrun(SCRIPT, nproc)
    losses = reports[0]["losses"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.3 * first, f"the loss did not fall: {first:.3f} -> {last:.3f}"
    for report in reports:
        assert report["world_size"] == nproc
        assert report["losses"] == losses, "ranks disagree on the global loss"
        assert report["sharding_type"] == "row_wise"
        assert report["changed_after_dump"], "the step after the dump changed nothing: the reload check is void"
        assert report["reload_equal"], "DynamicEmbLoad did not bring back the dumped rows"
