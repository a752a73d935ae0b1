"""One rank of the data x tensor-parallel HSTU test, or the one-process reference (any world size, TP = argv).

Usage: ``python hybrid_parallel_worker.py OUT_DIR TP``. A tiny HSTU model (a model-parallel item table looked up
once per tensor-parallel group, a data-parallel action table, two HSTU layers split by heads, a linear head, BCE)
is distributed by ``gr_parallel.distribute`` and trained a few steps on fixed global batches, each data-parallel
rank taking its contiguous share, with ``gr_parallel.clip_grad_norm_`` on the dense part. Global rank 0 writes
``OUT_DIR/result.json``: losses averaged over the global batch, clipped norms, and the full parameters (tensor-
and row-sharded ones reassembled).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import Tensor, nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from worker_exit import exit_without_teardown

import gr_parallel
from gr_models.configs import KernelBackend, get_hstu_config
from gr_models.modules.hstu_layer import build_hstu_layer
from gr_models.modules.preprocessing import HSTUSequence

DIM, HEADS, HEAD_DIM, ITEMS, ACTIONS = 8, 4, 4, 32, 4
GLOBAL_BATCH, STEPS, MAX_NORM = 8, 3, 0.3


def _sequence(lengths: Tensor) -> HSTUSequence:
    empty = torch.zeros(0, dtype=torch.int64)
    return HSTUSequence(
        values=torch.zeros(0),
        offsets=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        max_len=int(lengths.max()),
        scaling_seqlen=8,
        num_candidates=torch.zeros_like(lengths),
        contextual_len=0,
        timestamps=None,
        history_lengths=lengths,
        history_item_index=empty,
        history_event_end_index=empty,
        candidate_index=empty,
    )


class TinyHSTU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.items = EmbeddingCollection(
            tables=[EmbeddingConfig(name="item_table", embedding_dim=DIM, num_embeddings=ITEMS, feature_names=["item"])]
        )
        self.actions = EmbeddingCollection(
            tables=[
                EmbeddingConfig(name="action_table", embedding_dim=DIM, num_embeddings=ACTIONS, feature_names=["act"])
            ]
        )
        config = get_hstu_config(DIM, HEAD_DIM, HEADS, 2, kernel_backend=KernelBackend.PYTORCH)
        self.layers = nn.ModuleList(build_hstu_layer(config) for _ in range(2))
        self.head = nn.Linear(DIM, 1)

    def forward(self, items: KeyedJaggedTensor, actions: KeyedJaggedTensor, labels: Tensor) -> Tensor:
        item_embeddings = gr_parallel.lookup_split_over_tensor_parallel(self.items, items)["item"]
        x = item_embeddings.values() + self.actions(actions)["act"].values()
        lengths = items.lengths()
        sequence = _sequence(lengths)
        for layer in self.layers:
            x = layer(x, sequence)
        last = x.index_select(0, lengths.cumsum(0) - 1)
        return nn.functional.binary_cross_entropy_with_logits(self.head(last).squeeze(1), labels)


def _batch(step: int, dp_rank: int, dp_size: int) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor, Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    lengths = torch.randint(2, 6, (GLOBAL_BATCH,), generator=generator)
    items = torch.randint(0, ITEMS, (int(lengths.sum()),), generator=generator)
    actions = torch.randint(0, ACTIONS, (int(lengths.sum()),), generator=generator)
    labels = torch.randint(0, 2, (GLOBAL_BATCH,), generator=generator).float()
    share = GLOBAL_BATCH // dp_size
    first, stop = dp_rank * share, (dp_rank + 1) * share
    lo, hi = int(lengths[:first].sum()), int(lengths[:stop].sum())
    local = lengths[first:stop]
    return (
        KeyedJaggedTensor(keys=["item"], values=items[lo:hi], lengths=local),
        KeyedJaggedTensor(keys=["act"], values=actions[lo:hi], lengths=local),
        labels[first:stop],
    )


def _full_dense(param: Tensor) -> list:
    """A dense parameter as one rank-count-independent tensor (tensor-parallel shards gathered and unstrided)."""
    if not getattr(param, "tensor_model_parallel", False):
        return param.detach().tolist()
    group = gr_parallel.get_tensor_model_parallel_group()
    parts = [torch.empty_like(param) for _ in range(group.size())]
    dist.all_gather(parts, param.detach().contiguous(), group=group)
    dim, stride = param.partition_dim, param.partition_stride
    chunks = [part.chunk(stride, dim) for part in parts]
    return torch.cat([chunks[r][c] for c in range(stride) for r in range(group.size())], dim).tolist()


def _full_table(tensor: Tensor | ShardedTensor, rows: int) -> list:
    full = torch.zeros(rows, DIM)
    pieces = (
        [(s.metadata.shard_offsets, s.tensor.detach().clone()) for s in tensor.local_shards()]
        if isinstance(tensor, ShardedTensor)
        else [([0, 0], tensor.detach().clone())]
    )
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pieces)
    for (row, col), piece in (p for rank_pieces in gathered for p in rank_pieces):
        full[row : row + piece.shape[0], col : col + piece.shape[1]] = piece
    return full.tolist()


def _set_table(tensor: Tensor | ShardedTensor, full: Tensor) -> None:
    shards = tensor.local_shards() if isinstance(tensor, ShardedTensor) else []
    with torch.no_grad():
        for shard in shards:
            row, col = shard.metadata.shard_offsets
            rows, cols = shard.tensor.shape
            shard.tensor.copy_(full[row : row + rows, col : col + cols])


def main(out_dir: Path, tp_size: int) -> None:
    gr_parallel.initialize_distributed()
    gr_parallel.initialize_model_parallel(tensor_model_parallel_size=tp_size)
    gr_parallel.set_random_seed(0)
    dp_rank, dp_size = gr_parallel.get_data_parallel_rank(), gr_parallel.get_data_parallel_world_size()
    sharding = gr_parallel.ShardingOptions(
        constraints={
            "item_table": gr_parallel.model_parallel_constraint(["row_wise"]),
            "action_table": gr_parallel.data_parallel_constraint(),
        },
        fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.05},
    )
    model = gr_parallel.distribute(
        TinyHSTU(), sharding=sharding, dense_optimizer=lambda params: torch.optim.Adam(params, lr=0.01)
    )
    table_key = "items.embeddings.item_table.weight"
    _set_table(model.state_dict()[table_key], torch.arange(ITEMS * DIM, dtype=torch.float32).view(ITEMS, DIM) / 300)
    dense = list(gr_parallel.dense_parameters(model.module).values())
    losses, norms = [], []
    for step in range(STEPS):
        items, actions, labels = _batch(step, dp_rank, dp_size)
        model.optimizer.zero_grad()
        loss = model(items, actions, labels)
        loss.backward()
        norms.append(gr_parallel.clip_grad_norm_(dense, MAX_NORM).item())
        model.optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)  # every rank of a TP group holds its DP rank's loss
        losses.append(total.item() / dist.get_world_size())
    state = dict(model.module.named_parameters())
    result = {
        "losses": losses,
        "norms": norms,
        "dense": {name: _full_dense(state[name]) for name in gr_parallel.dense_parameters(model.module)},
        "items": _full_table(model.state_dict()[table_key], ITEMS),
        "tp_size": gr_parallel.get_tensor_model_parallel_world_size(),
        "dp_size": dp_size,
    }
    if dist.get_rank() == 0:
        (out_dir / "result.json").write_text(json.dumps(result))
    gr_parallel.destroy_global_state()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
    exit_without_teardown()
