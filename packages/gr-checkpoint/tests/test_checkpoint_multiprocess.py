"""A checkpoint saved by 2 gloo processes (DDP dense part, row-sharded table) loads in 1 process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import gr_checkpoint

WORKER = Path(__file__).with_name("gr_checkpoint_worker.py")


pytestmark = pytest.mark.slow  # 2-rank worker processes


class BareModel(nn.Module):
    """The worker's model as one process builds it: no DDP wrapper, the whole table."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(4, 2)
        self.table = nn.Parameter(torch.zeros(10, 3))


def test_two_rank_save_loads_in_one_process(tmp_path: Path, run_ranks: Callable[..., None]) -> None:
    run_ranks(WORKER, 2, str(tmp_path))
    expected = torch.load(tmp_path / "expected.pt")
    manifest = gr_checkpoint.read_manifest(tmp_path / "ckpt")
    assert manifest.world_size == 2
    assert manifest.model_tensors["table"] == gr_checkpoint.TensorSpec((10, 3), "float32")

    model = BareModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    extra_state = gr_checkpoint.load(tmp_path / "ckpt", model, optimizer)

    assert extra_state == {"saved_by_rank": 0}
    assert torch.equal(model.dense.weight, expected["dense.weight"])
    assert torch.equal(model.dense.bias, expected["dense.bias"])
    assert torch.equal(model.table, expected["table"])
    assert torch.equal(optimizer.state[model.table]["exp_avg"], expected["table.exp_avg"])
    assert torch.equal(optimizer.state[model.dense.weight]["exp_avg"], expected["dense.weight.exp_avg"])
    assert optimizer.param_groups[0]["lr"] == 0.1
    # Rank r held rows [5r, 5r + 5) and trained its local rows 0 and r + 1: global rows 0, 1, 5, 7.
    torch.manual_seed(0)
    nn.Linear(4, 2)
    initial_table = torch.randn(10, 3)
    moved = (model.table != initial_table).any(dim=1)
    assert moved.nonzero().flatten().tolist() == [0, 1, 5, 7]
