"""The dynamic tables' learning rates reach ``DistributedModelParallel.fused_optimizer`` (and so an LR
scheduler), and an unsharded collection refuses to train as a silent per-rank replica."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.distributed.types import ShardingType

from dynamicemb import (
    DynamicEmbeddingCollection,
    DynamicEmbeddingCollectionSharder,
    DynamicEmbeddingShardingPlanner,
    DynamicEmbInitializerArgs,
    DynamicEmbInitializerMode,
    DynamicEmbParameterConstraints,
    DynamicEmbTableOptions,
)
from dynamicemb.modules import common as modules_common

CONFIG = EmbeddingConfig(name="t", embedding_dim=2, num_embeddings=64, feature_names=["f"])


@pytest.fixture
def one_process_world() -> Iterator[None]:
    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sharded_collection() -> DistributedModelParallel:
    zeros = DynamicEmbInitializerArgs(mode=DynamicEmbInitializerMode.CONSTANT, value=0.0)
    constraints = {
        "t": DynamicEmbParameterConstraints(
            sharding_types=[ShardingType.ROW_WISE.value],
            use_dynamicemb=True,
            dynamicemb_options=DynamicEmbTableOptions(initializer_args=zeros),
        )
    }
    sharder = DynamicEmbeddingCollectionSharder(fused_params={"optimizer": "SGD", "learning_rate": 0.1})
    module = torch.nn.ModuleDict({"ec": EmbeddingCollection(tables=[CONFIG], device=torch.device("meta"))})
    planner = DynamicEmbeddingShardingPlanner(
        topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints, debug=False
    )
    plan = planner.collective_plan(module, [sharder])
    return DistributedModelParallel(module, device=torch.device("cpu"), plan=plan, sharders=[sharder])


def test_an_lr_scheduler_on_dmp_fused_optimizer_changes_the_dynamic_tables_step(one_process_world: None) -> None:
    dmp = _sharded_collection()
    optimizer = dmp.fused_optimizer
    assert [(g["dynamic_table"], g["lr"]) for g in optimizer.param_groups] == [("t", 0.1)]
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    ids = KeyedJaggedTensor(keys=["f"], values=torch.tensor([3, 7]), lengths=torch.tensor([1, 1]))
    rows = []
    for _ in range(2):
        optimizer.zero_grad()
        dmp.module["ec"](ids)["f"].values().sum().backward()  # gradient 1 for every element of both rows
        optimizer.step()
        scheduler.step()
        (table,) = dmp.module["ec"].dynamic_embedding_tables().values()
        rows.append(table.lookup(torch.tensor([3, 7]), training=False)[0].clone())
    torch.testing.assert_close(rows[0], torch.full((2, 2), -0.1))  # lr 0.1
    torch.testing.assert_close(rows[1], torch.full((2, 2), -0.15))  # lr 0.05 after the scheduler's step


def test_an_unsharded_collection_refuses_to_train_in_a_world_of_several_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(modules_common.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(modules_common.dist, "get_world_size", lambda group=None: 2)
    ids = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1]), lengths=torch.tensor([1]))
    with pytest.raises(RuntimeError, match=r"world of 2 processes.*process_local=True"):
        DynamicEmbeddingCollection(tables=[CONFIG])(ids)
    DynamicEmbeddingCollection(tables=[CONFIG], process_local=True)(ids)  # a per-rank table on purpose
    DynamicEmbeddingCollection(tables=[CONFIG]).eval()(ids)  # evaluation inserts nothing


@pytest.mark.parametrize(("module_fused_params", "value_dim"), [({}, 2), ({"ec": {"optimizer": "ADAM"}}, 2 + 4)])
def test_a_module_s_own_fused_params_size_its_dynamic_tables(
    module_fused_params: dict[str, dict[str, str]], value_dim: int
) -> None:
    constraints = {"t": DynamicEmbParameterConstraints(use_dynamicemb=True)}
    sharder = DynamicEmbeddingCollectionSharder(
        fused_params={"optimizer": "SGD"}, module_fused_params=module_fused_params
    )
    module = torch.nn.ModuleDict({"ec": EmbeddingCollection(tables=[CONFIG], device=torch.device("meta"))})
    planner = DynamicEmbeddingShardingPlanner(
        topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints, debug=False
    )
    planner.plan(module, [sharder])
    assert planner.dynamic_table_memory["t"].value_dim == value_dim  # embedding + Adam's two moments
    assert (sharder.fused_params_for("ec") or {}).get("optimizer") == ("ADAM" if module_fused_params else "SGD")
