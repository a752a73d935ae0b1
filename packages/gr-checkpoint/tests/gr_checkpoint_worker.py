"""One rank of the multi-process gr_checkpoint test; run with torchrun's environment variables set.

Usage: ``python gr_checkpoint_worker.py OUT_DIR``. Trains a model with a DDP dense part and a
row-sharded (DTensor) table for two Adam steps, saves it with ``gr_checkpoint.save`` to
``OUT_DIR/ckpt``, and rank 0 writes the full (unsharded) expected state to ``OUT_DIR/expected.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from worker_exit import exit_without_teardown

import gr_checkpoint

TABLE_ROWS, DIM = 10, 3


class HybridModel(nn.Module):
    """``dense``: replicated (DDP); ``table``: ``[TABLE_ROWS, DIM]`` rows split over the ranks."""

    def __init__(self, dense: nn.Module, table: torch.Tensor) -> None:
        super().__init__()
        self.dense = dense
        self.table = nn.Parameter(table)

    def forward(self, inputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        local_table = self.table.to_local() if hasattr(self.table, "to_local") else self.table
        return self.dense(inputs).sum() + local_table[rows].square().sum()


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    dense = nn.Linear(4, 2)
    full_table = torch.randn(TABLE_ROWS, DIM)
    model = HybridModel(DistributedDataParallel(dense), distribute_tensor(full_table, mesh, [Shard(0)]))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, foreach=False)

    generator = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(3, 4, generator=generator), torch.tensor([0, rank + 1])).backward()
        optimizer.step()

    gr_checkpoint.save(out_dir / "ckpt", model, optimizer, extra_state={"saved_by_rank": rank})

    table_state = optimizer.state[model.table]
    expected = {
        "dense.weight": dense.weight.detach().clone(),
        "dense.bias": dense.bias.detach().clone(),
        "table": cast(DTensor, model.table).full_tensor().detach(),
        "table.exp_avg": table_state["exp_avg"].full_tensor(),
        "dense.weight.exp_avg": optimizer.state[dense.weight]["exp_avg"].clone(),
    }
    if rank == 0:
        torch.save(expected, out_dir / "expected.pt")
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    exit_without_teardown()
