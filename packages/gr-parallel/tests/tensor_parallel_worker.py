"""One rank of the tensor-parallel tests (TP = world size); compares against the same computation in one process.

Usage: ``python tensor_parallel_worker.py OUT_DIR``. Writes ``OUT_DIR/rank<RANK>.json``: for each check the
largest absolute difference from the one-process result (or an observed value); the test asserts on them.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from gr_parallel_launch import exit_without_teardown
from torch import Tensor, nn
from torchrec.distributed.comm_ops import set_gradient_division
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

import gr_parallel
from gr_parallel import tensor_parallel as tp
from gr_parallel.grads import clip_grad_norm_, grad_norm


def _diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def _mappings(rank: int, size: int) -> dict[str, float]:
    x = torch.arange(6.0).view(3, 2) + 10 * rank
    x.requires_grad_(True)
    gathered = tp.gather_from_tensor_parallel_region(x)
    expected = torch.cat([torch.arange(6.0).view(3, 2) + 10 * r for r in range(size)], dim=-1)
    upstream = torch.arange(float(gathered.numel())).view_as(gathered)
    gathered.backward(upstream)
    out = {"gather": _diff(gathered, expected), "gather_grad": _diff(x.grad, upstream.chunk(size, -1)[rank])}

    full = torch.arange(12.0).view(3, 4).requires_grad_(True)
    scattered = tp.scatter_to_tensor_parallel_region(full)
    (scattered * (rank + 1)).sum().backward()
    out["scatter"] = _diff(scattered, full.detach().chunk(size, -1)[rank])
    grad_blocks = [torch.full((3, 4 // size), float(r + 1)) for r in range(size)]
    out["scatter_grad"] = _diff(full.grad, torch.cat(grad_blocks, -1))

    part = torch.full((2,), rank + 1.0, requires_grad=True)
    total = tp.sum_over_tensor_parallel_region(part)
    (total * (rank + 1)).sum().backward()
    out["sum"] = _diff(total, torch.full((2,), size * (size + 1) / 2))
    out["sum_grad"] = _diff(part.grad, torch.full((2,), size * (size + 1) / 2))

    rows = [r + 2 for r in range(size)]  # uneven blocks
    block = torch.full((rows[rank], 2), float(rank), requires_grad=True)
    stacked = tp.gather_rows_from_tensor_parallel_region(block, rows)
    weights = torch.arange(float(stacked.shape[0])).unsqueeze(1)
    (stacked * weights).sum().backward()
    start = sum(rows[:rank])
    out["gather_rows"] = _diff(stacked, torch.cat([torch.full((n, 2), float(r)) for r, n in enumerate(rows)]))
    out["gather_rows_grad"] = _diff(block.grad, weights[start : start + rows[rank]].expand(-1, 2))
    return out


def _mlp_checks(rank: int, size: int, autocast: bool) -> tuple[dict[str, float], list[Tensor], list[Tensor]]:
    """Column-parallel -> SiLU -> row-parallel against the full two-layer MLP; returns diffs and both grad sets."""
    torch.manual_seed(1)
    first, second = nn.Linear(6, 8), nn.Linear(8, 6)
    column = tp.ColumnParallelLinear.from_linear(first)
    row = tp.RowParallelLinear.from_linear(second)
    x = torch.randn(5, 6)
    upstream = torch.randn(5, 6)
    x_full, x_tp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y_full = second(F.silu(first(x_full)))
        y_tp = row(F.silu(column(x_tp)))
    y_full.float().backward(upstream)
    y_tp.float().backward(upstream)
    diffs = {
        "output": _diff(y_tp, y_full),
        "input_grad": _diff(x_tp.grad, x_full.grad),
        "column_weight_grad": _diff(column.weight.grad, first.weight.grad.chunk(size, 0)[rank]),
        "column_bias_grad": _diff(column.bias.grad, first.bias.grad.chunk(size, 0)[rank]),
        "row_weight_grad": _diff(row.weight.grad, second.weight.grad.chunk(size, 1)[rank]),
        "row_bias_grad": _diff(row.bias.grad, second.bias.grad),
    }
    return (
        diffs,
        [column.weight, column.bias, row.weight, row.bias],
        [first.weight, first.bias, second.weight, second.bias],
    )


def _clip_checks(tp_params: list[Tensor], full_params: list[Tensor], rank: int, size: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, norm_type in (("l2", 2.0), ("inf", math.inf)):
        tp_copy = [p.detach().clone().requires_grad_(True) for p in tp_params]
        full_copy = [p.detach().clone().requires_grad_(True) for p in full_params]
        for copy, source in zip(tp_copy + full_copy, tp_params + full_params):
            copy.grad = source.grad.clone()
            if hasattr(source, "tensor_model_parallel"):
                copy.tensor_model_parallel = source.tensor_model_parallel
        norm_tp = clip_grad_norm_(tp_copy, 0.05, norm_type)
        norm_full = torch.nn.utils.clip_grad_norm_(full_copy, 0.05, norm_type)
        out[f"clip_{name}_norm"] = _diff(norm_tp, norm_full)
        out[f"clip_{name}_norm_value"] = norm_full.item()
        shards = [
            full_copy[0].grad.chunk(size, 0)[rank],
            full_copy[1].grad.chunk(size, 0)[rank],
            full_copy[2].grad.chunk(size, 1)[rank],
            full_copy[3].grad,
        ]
        out[f"clip_{name}_grads"] = max(_diff(p.grad, s) for p, s in zip(tp_copy, shards))
    out["norm_without_grads"] = grad_norm([nn.Parameter(torch.ones(2))]).item()
    return out


def _layer_norm_checks(rank: int, size: int) -> dict[str, float]:
    torch.manual_seed(2)
    full = nn.LayerNorm(8)
    with torch.no_grad():
        full.weight.add_(torch.randn(8))
        full.bias.add_(torch.randn(8))
    split = tp.TensorParallelLayerNorm.from_layer_norm(full)
    x = 3.0 + 2.0 * torch.randn(5, 8)
    upstream = torch.randn(5, 8)
    x_full = x.clone().requires_grad_(True)
    x_local = x.chunk(size, -1)[rank].clone().requires_grad_(True)
    y_full, y_local = full(x_full), split(x_local)
    y_full.backward(upstream)
    y_local.backward(upstream.chunk(size, -1)[rank])
    return {
        "norm_output": _diff(y_local, y_full.chunk(size, -1)[rank]),
        "norm_input_grad": _diff(x_local.grad, x_full.grad.chunk(size, -1)[rank]),
        "norm_weight_grad": _diff(split.weight.grad, full.weight.grad.chunk(size, 0)[rank]),
        "norm_bias_grad": _diff(split.bias.grad, full.bias.grad.chunk(size, 0)[rank]),
        "norm_sharded_attribute": float(split.weight.tensor_model_parallel),
    }


def _rng_checks() -> dict[str, object]:
    default_before = torch.get_rng_state()
    with tp.fork_tensor_parallel_rng(torch.device("cpu")):
        forked = torch.rand(4)
    with tp.fork_tensor_parallel_rng(torch.device("cpu")):
        forked_again = torch.rand(4)
    after = torch.rand(4)
    torch.set_rng_state(default_before)
    unforked = torch.rand(4)
    return {
        "forked": forked.tolist(),
        "forked_again": forked_again.tolist(),
        "default_untouched": _diff(after, unforked),
    }


class _TwoWidthLookup(nn.Module):
    """Features a, b from a table of width 3, feature c from one of width 5 (two dtypes-equal value widths)."""

    def __init__(self) -> None:
        super().__init__()
        self.narrow = EmbeddingCollection(
            tables=[EmbeddingConfig(num_embeddings=10, embedding_dim=3, name="t0", feature_names=["a", "b"])]
        )
        self.wide = EmbeddingCollection(
            tables=[EmbeddingConfig(num_embeddings=7, embedding_dim=5, name="t1", feature_names=["c"])]
        )

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        jagged = features.to_dict()
        narrow = self.narrow(KeyedJaggedTensor.from_jt_dict({k: jagged[k] for k in ("a", "b")}))
        return {**narrow, **self.wide(KeyedJaggedTensor.from_jt_dict({"c": jagged["c"]}))}

    def weight(self, table: str) -> Tensor:
        collection = self.narrow if table == "t0" else self.wide
        return collection.embeddings[table].weight


def _embedding_checks(gradient_division: bool) -> dict[str, float]:
    """Plain (unsharded) collections: summed over ranks, their gradients equal the one-process ones when the
    sharded-table gradient scaling is off (TorchRec's gradient division off)."""
    set_gradient_division(gradient_division)
    torch.manual_seed(3)
    reference, split = _TwoWidthLookup(), _TwoWidthLookup()
    split.load_state_dict(reference.state_dict())
    lengths = torch.tensor([1, 0, 2, 3, 1, 2, 2, 0, 1, 1, 0, 0, 3, 1, 2])  # 3 keys x 5 samples
    features = KeyedJaggedTensor(
        keys=["a", "b", "c"],
        values=torch.cat([torch.randint(0, 10, (13,)), torch.randint(0, 7, (6,))]),
        lengths=lengths,
    )
    expected = reference(features)
    gathered = tp.lookup_split_over_tensor_parallel(split, features)
    loss_weights = {name: torch.randn_like(expected[name].values()) for name in ("a", "b", "c")}
    sum((expected[n].values() * w).sum() for n, w in loss_weights.items()).backward()
    sum((gathered[n].values() * w).sum() for n, w in loss_weights.items()).backward()
    out = {
        "lookup_values": max(_diff(gathered[n].values(), expected[n].values()) for n in loss_weights),
        "lookup_lengths": max(_diff(gathered[n].lengths(), expected[n].lengths()) for n in loss_weights),
    }
    for table in ("t0", "t1"):
        own = split.weight(table).grad.clone()
        summed = own.clone()
        dist.all_reduce(summed)
        out[f"lookup_{table}_grad_summed"] = _diff(summed, reference.weight(table).grad)
        out[f"lookup_{table}_grad_own_norm"] = own.norm().item()
    set_gradient_division(True)
    return out


def main(out_dir: Path) -> None:
    gr_parallel.initialize_distributed()
    size = gr_parallel.get_world_size()
    gr_parallel.initialize_model_parallel(tensor_model_parallel_size=size)
    gr_parallel.set_random_seed(1234)
    rank = gr_parallel.get_tensor_model_parallel_rank()
    report: dict[str, object] = {"tp_size": gr_parallel.get_tensor_model_parallel_world_size()}
    report.update(_mappings(rank, size))
    mlp, tp_params, full_params = _mlp_checks(rank, size, autocast=False)
    report.update({f"mlp_{k}": v for k, v in mlp.items()})
    report.update(_clip_checks(tp_params, full_params, rank, size))
    bf16, _, _ = _mlp_checks(rank, size, autocast=True)
    report.update({f"mlp_bf16_{k}": v for k, v in bf16.items()})
    report.update(_layer_norm_checks(rank, size))
    report.update(_rng_checks())
    report.update(_embedding_checks(gradient_division=False))
    report.update({f"divided_{k}": v for k, v in _embedding_checks(gradient_division=True).items()})
    gr_parallel.destroy_global_state()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    exit_without_teardown()
