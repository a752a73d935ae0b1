"""One rank of the multi-process gr_parallel test; run with torchrun's environment variables set.

Usage: ``python gr_parallel_worker.py OUT_DIR``. Writes what this rank observed to
``OUT_DIR/rank<RANK>.json``; the test process makes the assertions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from gr_parallel_launch import exit_without_teardown

import gr_parallel


def _sum_over(group: dist.ProcessGroup | None, value: float) -> float:
    tensor = torch.tensor([value])
    dist.all_reduce(tensor, group=group)
    return tensor.item()


def main(out_dir: Path) -> None:
    observed: dict[str, object] = {}
    gr_parallel.initialize_distributed()
    rank = gr_parallel.get_rank()
    observed["backend"] = dist.get_backend()
    observed["rank"] = rank
    observed["world_size"] = gr_parallel.get_world_size()
    observed["world_sum"] = _sum_over(dist.group.WORLD, rank + 1.0)

    gr_parallel.initialize_model_parallel(tensor_model_parallel_size=2)
    observed["tp2"] = {
        "tp_rank": gr_parallel.get_tensor_model_parallel_rank(),
        "tp_size": gr_parallel.get_tensor_model_parallel_world_size(),
        "dp_rank": gr_parallel.get_data_parallel_rank(),
        "dp_size": gr_parallel.get_data_parallel_world_size(),
        "tp_sum": _sum_over(gr_parallel.get_tensor_model_parallel_group(), rank + 1.0),
        "dp_sum": _sum_over(gr_parallel.get_data_parallel_group(), rank + 1.0),
    }
    try:
        gr_parallel.initialize_model_parallel(tensor_model_parallel_size=1)
        observed["resize_error"] = None
    except RuntimeError as error:
        observed["resize_error"] = str(error)

    gr_parallel.destroy_global_state()
    observed["initialized_after_destroy"] = dist.is_initialized() or gr_parallel.model_parallel_is_initialized()

    gr_parallel.initialize_distributed()
    gr_parallel.initialize_model_parallel(tensor_model_parallel_size=1)
    observed["tp1"] = {
        "tp_rank": gr_parallel.get_tensor_model_parallel_rank(),
        "tp_size": gr_parallel.get_tensor_model_parallel_world_size(),
        "dp_rank": gr_parallel.get_data_parallel_rank(),
        "dp_size": gr_parallel.get_data_parallel_world_size(),
        "dp_sum": _sum_over(gr_parallel.get_data_parallel_group(), rank + 1.0),
    }
    gr_parallel.set_random_seed(1234)
    observed["seeded_draw"] = torch.rand(4).tolist()
    gr_parallel.destroy_global_state()

    (out_dir / f"rank{rank}.json").write_text(json.dumps(observed))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    exit_without_teardown()
