"""``distribute`` on one GPU (a one-process NCCL world): dynamic and data-parallel tables train and the
LR scheduler reaches the dynamic table; static tables are refused when fbgemm has no CUDA kernels."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

import gr_parallel
from dynamicemb import (
    DynamicEmbeddingCollection,
    DynamicEmbInitializerArgs,
    DynamicEmbInitializerMode,
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbTableOptions,
)
from gr_parallel.sharding import _fbgemm_has_cuda_kernels

DIM = 8


class DynamicAndReplicated(nn.Module):
    def __init__(self, device: torch.device) -> None:
        super().__init__()
        replicated = EmbeddingConfig(name="dp", embedding_dim=DIM, num_embeddings=16, feature_names=["f_dp"])
        self.data_parallel = EmbeddingCollection(tables=[replicated], device=device)
        dyn = EmbeddingConfig(name="dyn", embedding_dim=DIM, num_embeddings=4096, feature_names=["f_dyn"])
        options = DynamicEmbTableOptions(
            initializer_args=DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.CONSTANT, value=0.1),
            global_hbm_for_values=1 << 20,
        )
        adam = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM, learning_rate=0.01)
        self.dynamic = DynamicEmbeddingCollection(tables=[dyn], device=device, table_options=options, optimizer=adam)
        self.head = nn.Linear(2 * DIM, 1, device=device)

    def forward(self, dp_ids: KeyedJaggedTensor, dyn_ids: KeyedJaggedTensor) -> torch.Tensor:
        dp = self.data_parallel(dp_ids)["f_dp"].values()
        dyn = self.dynamic(dyn_ids)["f_dyn"].values()
        return self.head(torch.cat([dp, dyn], dim=1)).square().mean()


def _ids(feature: str, high: int, device: torch.device, seed: int) -> KeyedJaggedTensor:
    values = torch.randint(0, high, (32,), generator=torch.Generator().manual_seed(seed))
    return KeyedJaggedTensor(keys=[feature], values=values, lengths=torch.ones(32, dtype=torch.int64)).to(device)


@pytest.mark.gpu
def test_distribute_trains_dynamic_and_replicated_tables_on_one_gpu() -> None:
    gr_parallel.initialize_distributed()  # a one-process NCCL world
    try:
        device = gr_parallel.get_device()
        model = DynamicAndReplicated(device)
        dm = gr_parallel.distribute(
            model,
            sharding=gr_parallel.ShardingOptions(constraints={"dp": gr_parallel.data_parallel_constraint()}),
            dense_optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        )
        scheduler = torch.optim.lr_scheduler.StepLR(dm.optimizer, step_size=1, gamma=0.5)
        losses = []
        for step in range(4):
            dm.optimizer.zero_grad()
            loss = dm(_ids("f_dp", 16, device, step), _ids("f_dyn", 1 << 40, device, 100 + step))
            loss.backward()
            dm.optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        dm.optimizer.zero_grad()
        (table,) = dm.sharding.sharded_modules["dynamic"].dynamic_embedding_tables().values()
        rows = torch.cat([embeddings for _, embeddings, _, _ in table.export()])
    finally:
        gr_parallel.destroy_global_state()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert table.optimizer.args.learning_rate == pytest.approx(0.01 * 0.5**4)
    assert rows.shape == (4 * 32, DIM) and rows.ne(0.1).any()


@pytest.mark.gpu
def test_static_tables_on_a_gpu_without_fbgemm_cuda_kernels_are_refused() -> None:
    if _fbgemm_has_cuda_kernels():
        pytest.skip("this fbgemm has CUDA kernels: static tables can be sharded")
    gr_parallel.initialize_distributed()
    try:
        device = gr_parallel.get_device()
        static = EmbeddingConfig(name="s", embedding_dim=DIM, num_embeddings=64, feature_names=["f"])
        model = nn.ModuleDict({"ec": EmbeddingCollection(tables=[static], device=device)})
        with pytest.raises(NotImplementedError, match=r"static tables \['s'\]"):
            gr_parallel.shard_embedding_modules(model)
    finally:
        gr_parallel.destroy_global_state()
