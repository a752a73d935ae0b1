"""The dynamicemb planner: constraints, inferred capacities, memory accounting, topology, errors."""

from __future__ import annotations

import math

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingCollection
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import ParameterConstraints, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import DataType, EmbeddingConfig

from dynamicemb import (
    DynamicEmbOptimizerArgs,
    DynamicEmbOptimizerType,
    DynamicEmbTableOptions,
    FrequencyAdmissionStrategy,
)
from dynamicemb.distributed import DynamicEmbeddingCollectionSharder
from dynamicemb.embedding_table import DynamicEmbeddingTable
from dynamicemb.planner import (
    DynamicEmbeddingEnumerator,
    DynamicEmbeddingShardingPlanner,
    DynamicEmbParameterConstraints,
    DynamicEmbParameterSharding,
    KeyDistribution,
    dynamic_table_memory,
    shard_capacity,
    shard_table_options,
)
from dynamicemb.planner.memory import INDEX_BYTES_PER_SLOT

ROW_WISE = ShardingType.ROW_WISE.value
CUSTOMIZED = EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value
ADAM = {"optimizer": EmbOptimType.ADAM, "learning_rate": 0.01}


def _configs() -> list[EmbeddingConfig]:
    return [
        EmbeddingConfig(name="d", embedding_dim=16, num_embeddings=1000, feature_names=["fd"]),
        EmbeddingConfig(name="s", embedding_dim=16, num_embeddings=64, feature_names=["fs"]),
    ]


def _planner(topology: Topology, constraints: dict, **kwargs) -> DynamicEmbeddingShardingPlanner:
    return DynamicEmbeddingShardingPlanner(
        eb_configs=_configs(),
        topology=topology,
        constraints=constraints,
        enumerator=DynamicEmbeddingEnumerator(topology=topology, constraints=constraints),
        storage_reservation=HeuristicalStorageReservation(percentage=0.05),
        debug=False,
        **kwargs,
    )


def _ec() -> EmbeddingCollection:
    return EmbeddingCollection(tables=_configs(), device=torch.device("meta"))


# --- constraints and plan entries -----------------------------------------------------------------------
@pytest.mark.parametrize("sharding", [ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value])
def test_dynamic_constraint_rejects_other_sharding_types(sharding: str) -> None:
    with pytest.raises(ValueError, match="row-wise only"):
        DynamicEmbParameterConstraints(use_dynamicemb=True, sharding_types=[sharding])
    DynamicEmbParameterConstraints(use_dynamicemb=False, sharding_types=[sharding])  # an ordinary table


def test_dynamic_constraint_rejects_other_compute_kernels() -> None:
    with pytest.raises(ValueError, match="compute_kernels"):
        DynamicEmbParameterConstraints(use_dynamicemb=True, compute_kernels=[EmbeddingComputeKernel.FUSED.value])
    with pytest.raises(TypeError, match="DynamicEmbTableOptions"):
        DynamicEmbParameterConstraints(use_dynamicemb=True, dynamicemb_options={"caching": True})  # type: ignore[arg-type]


def test_constraints_hash_with_their_options() -> None:
    a = DynamicEmbParameterConstraints(use_dynamicemb=True)
    b = DynamicEmbParameterConstraints(
        use_dynamicemb=True, dynamicemb_options=DynamicEmbTableOptions(bucket_capacity=64)
    )
    assert hash(a) == hash(DynamicEmbParameterConstraints(use_dynamicemb=True))
    assert hash(a) != hash(b)
    assert a.key_distribution is KeyDistribution.HASH
    assert DynamicEmbParameterConstraints(key_distribution="modulo").key_distribution is KeyDistribution.MODULO


def test_parameter_sharding_is_row_wise_customized_only() -> None:
    with pytest.raises(ValueError, match="row-wise only"):
        DynamicEmbParameterSharding(sharding_type=ShardingType.TABLE_WISE.value, compute_kernel=CUSTOMIZED)
    with pytest.raises(ValueError, match="compute_kernel"):
        DynamicEmbParameterSharding(sharding_type=ROW_WISE, compute_kernel=EmbeddingComputeKernel.FUSED.value)


# --- capacities -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("num_embeddings", "world_size", "bucket_capacity", "max_capacity", "expected"),
    [
        (1000, 2, 128, None, 512),  # 500 -> 512
        (1000, 3, 128, None, 512),  # 334 -> 512
        (10, 2, 128, None, 128),  # at least one bucket
        (1 << 20, 8, 128, None, 1 << 17),  # exact power of two
        (100, 4, 16, None, 32),  # 25 -> 32
        (1000, 2, 128, 300, 512),  # a user's per-shard capacity, rounded up
        (1000, 2, 128, 50, 128),
    ],
)
def test_shard_capacity(num_embeddings, world_size, bucket_capacity, max_capacity, expected) -> None:
    options = DynamicEmbTableOptions(bucket_capacity=bucket_capacity, max_capacity=max_capacity)
    assert shard_capacity(num_embeddings, options, world_size) == expected


def test_shard_options_split_the_hbm_budget() -> None:
    options = DynamicEmbTableOptions(global_hbm_for_values=1001)
    shard = shard_table_options(1000, options, 2)
    assert (shard.max_capacity, shard.global_hbm_for_values) == (512, 501)
    assert options.max_capacity is None and options.global_hbm_for_values == 1001  # the user's options stay


# --- memory accounting ------------------------------------------------------------------------------------
def _tensor_bytes(obj: object) -> int:
    """Bytes of every tensor reachable from ``obj`` through attributes and containers (each storage once)."""
    seen_objects: set[int] = set()
    seen_storages: set[int] = set()
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen_objects or isinstance(item, (str, bytes, int, float, bool, type)) or item is None:
            continue
        seen_objects.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen_storages and storage.nbytes():
                seen_storages.add(storage.data_ptr())
                total += storage.nbytes()
            continue
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)
        elif hasattr(item, "__dict__"):
            stack.extend(vars(item).values())
    return total


_OPT = DynamicEmbOptimizerType
OPTION_CASES = {
    "sgd": (DynamicEmbTableOptions(), _OPT.SGD),
    "adam": (DynamicEmbTableOptions(), _OPT.ADAM),
    "rowwise_adagrad_split": (DynamicEmbTableOptions(global_hbm_for_values=20_000), _OPT.ROWWISE_ADAGRAD),
    "adagrad_caching": (DynamicEmbTableOptions(caching=True, global_hbm_for_values=40_000), _OPT.ADAGRAD),
    "admission": (DynamicEmbTableOptions(admit_strategy=FrequencyAdmissionStrategy(2)), _OPT.SGD),
    "inference": (DynamicEmbTableOptions(training=False), _OPT.SGD),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_memory_accounting_matches_what_a_shard_allocates(case: str) -> None:
    options, optimizer_type = OPTION_CASES[case]
    config = EmbeddingConfig(
        name="t", embedding_dim=12, num_embeddings=3000, feature_names=["f"], data_type=DataType.FP32
    )
    optimizer = DynamicEmbOptimizerArgs(optimizer=optimizer_type)
    world_size = 2
    memory = dynamic_table_memory(config, options, optimizer, world_size, "cpu")
    table = DynamicEmbeddingTable(
        name="t",
        dim=12,
        num_embeddings=3000,
        options=shard_table_options(3000, options, world_size),
        optimizer=optimizer,
        device="cpu",
    )
    assert memory.shard_capacity == table.max_capacity == 2048
    assert memory.device_bytes == 0  # a CPU compute device: everything is host memory
    assert abs(memory.host_bytes - _tensor_bytes(table)) <= 64, (memory, _tensor_bytes(table))


def test_memory_split_between_hbm_and_host_on_cuda() -> None:
    config = EmbeddingConfig(name="t", embedding_dim=16, num_embeddings=1000, feature_names=["f"])
    adam = DynamicEmbOptimizerArgs(optimizer=DynamicEmbOptimizerType.ADAM)
    row_bytes = (16 + 32) * 4
    split = dynamic_table_memory(
        config, DynamicEmbTableOptions(global_hbm_for_values=2 * 100 * row_bytes), adam, 2, "cuda"
    )
    assert (split.shard_capacity, split.value_dim) == (512, 48)
    assert split.value_device_bytes == 100 * row_bytes and split.value_host_bytes == 412 * row_bytes
    assert split.device_bytes == 512 * INDEX_BYTES_PER_SLOT + 8 + 100 * row_bytes
    assert split.host_bytes == 412 * row_bytes
    caching = DynamicEmbTableOptions(caching=True, global_hbm_for_values=2 * 100 * row_bytes)
    cached = dynamic_table_memory(config, caching, adam, 2, "cuda")  # a cache of max(64, one bucket) = 128 slots
    assert cached.device_bytes == (512 + 128) * INDEX_BYTES_PER_SLOT + 16 + 128 * row_bytes
    assert cached.host_bytes == 512 * row_bytes
    with pytest.raises(ValueError, match="caching=True needs global_hbm_for_values"):
        dynamic_table_memory(config, DynamicEmbTableOptions(caching=True), adam, 2, "cuda")


# --- planning ---------------------------------------------------------------------------------------------
def _constraints(**dynamic_options) -> dict[str, ParameterConstraints]:
    return {
        "d": DynamicEmbParameterConstraints(
            sharding_types=[ROW_WISE],
            use_dynamicemb=True,
            dynamicemb_options=DynamicEmbTableOptions(**dynamic_options),
            key_distribution=KeyDistribution.MODULO,
        ),
        "s": ParameterConstraints(sharding_types=[ROW_WISE]),
    }


def test_plan_places_dynamic_tables_row_wise_over_every_rank() -> None:
    topology = Topology(world_size=2, local_world_size=2, compute_device="cpu")
    constraints = _constraints()
    planner = _planner(topology, constraints)
    sharder = DynamicEmbeddingCollectionSharder(fused_params=ADAM)
    plan = planner.plan(_ec(), [sharder])
    dynamic, static = plan.plan[""]["d"], plan.plan[""]["s"]
    assert isinstance(dynamic, DynamicEmbParameterSharding)
    assert (dynamic.sharding_type, dynamic.compute_kernel, dynamic.ranks) == (ROW_WISE, CUSTOMIZED, [0, 1])
    assert dynamic.key_distribution is KeyDistribution.MODULO and dynamic.shard_capacity == 512
    assert dynamic.dynamicemb_options is constraints["d"].dynamicemb_options
    memory = planner.dynamic_table_memory["d"]
    assert memory.value_dim == 16 + 32  # Adam's two moments beside the embedding
    assert dynamic.shard_host_bytes == memory.host_bytes == 512 * (INDEX_BYTES_PER_SLOT + 48 * 4) + 8
    assert [s.shard_sizes for s in dynamic.sharding_spec.shards] == [[500, 16], [500, 16]]
    assert not isinstance(static, DynamicEmbParameterSharding) and static.compute_kernel != CUSTOMIZED
    assert static.sharding_type == ROW_WISE


def test_enumerator_leaves_dynamic_tables_out() -> None:
    topology = Topology(world_size=2, local_world_size=2, compute_device="cpu")
    enumerator = DynamicEmbeddingEnumerator(topology=topology, constraints=_constraints())
    options = enumerator.enumerate(_ec(), [DynamicEmbeddingCollectionSharder()])
    assert {o.name for o in options} == {"s"}


def test_dynamic_tables_take_their_memory_out_of_the_topology() -> None:
    need = dynamic_table_memory(
        _configs()[0], DynamicEmbTableOptions(), DynamicEmbOptimizerArgs.from_fused_params(ADAM), 2, "cpu"
    )
    sharder = DynamicEmbeddingCollectionSharder(fused_params=ADAM)

    def plan_with(ddr_cap: int) -> None:
        topology = Topology(world_size=2, local_world_size=2, compute_device="cpu", ddr_cap=ddr_cap)
        planner = _planner(topology, _constraints())
        planner.plan(_ec(), [sharder])
        assert [d.storage.ddr for d in planner._topology.devices] == [ddr_cap, ddr_cap]  # restored after planning

    plan_with(need.host_bytes + (64 << 20))
    with pytest.raises(PlannerError):  # the static table no longer fits beside the dynamic one
        plan_with(need.host_bytes + 1024)
    with pytest.raises(ValueError, match="do not fit on rank 0"):
        plan_with(need.host_bytes - 1)


def test_hbm_shortage_names_the_tables() -> None:
    topology = Topology(world_size=2, local_world_size=2, compute_device="cuda", hbm_cap=1 << 10, ddr_cap=1 << 30)
    with pytest.raises(ValueError, match=r"do not fit.*d: \d+ B device"):
        _planner(topology, _constraints()).plan(_ec(), [DynamicEmbeddingCollectionSharder(fused_params=ADAM)])


# --- clear errors -----------------------------------------------------------------------------------------
def test_unknown_table_in_constraints() -> None:
    topology = Topology(world_size=2, local_world_size=2, compute_device="cpu")
    constraints = {**_constraints(), "nope": ParameterConstraints()}
    with pytest.raises(ValueError, match=r"\['nope'\] that are not in eb_configs"):
        _planner(topology, constraints)
    dynamic_unknown = {**_constraints(), "ghost": DynamicEmbParameterConstraints(use_dynamicemb=True)}
    planner = DynamicEmbeddingShardingPlanner(topology=topology, constraints=dynamic_unknown, debug=False)
    with pytest.raises(ValueError, match=r"dynamic tables \['ghost'\] that the model does not have"):
        planner.plan(_ec(), [DynamicEmbeddingCollectionSharder()])


def test_dynamic_table_needs_a_dynamicemb_sharder() -> None:
    topology = Topology(world_size=2, local_world_size=2, compute_device="cpu")
    with pytest.raises(TypeError, match="sharded by EmbeddingCollectionSharder"):
        _planner(topology, _constraints()).plan(_ec(), [EmbeddingCollectionSharder()])


def test_dynamic_tables_need_the_dynamicemb_enumerator() -> None:
    topology = Topology(world_size=2, local_world_size=2, compute_device="cpu")
    constraints = _constraints()
    with pytest.raises(TypeError, match="DynamicEmbeddingEnumerator"):
        DynamicEmbeddingShardingPlanner(
            topology=topology, constraints=constraints, enumerator=EmbeddingEnumerator(topology, 8, constraints)
        )
    with pytest.raises(ValueError, match="pass the same constraints"):
        DynamicEmbeddingShardingPlanner(
            topology=topology, constraints=constraints, enumerator=DynamicEmbeddingEnumerator(topology=topology)
        )


def test_default_sharders_put_dynamicemb_first() -> None:
    from torchrec import EmbeddingBagCollection

    from dynamicemb.distributed import DynamicEmbeddingBagCollectionSharder
    from dynamicemb.planner.planner import default_sharders

    sharders = default_sharders()
    by_type = {s.module_type: s for s in sharders}
    assert len(by_type) == len(sharders)
    assert isinstance(by_type[EmbeddingCollection], DynamicEmbeddingCollectionSharder)
    assert isinstance(by_type[EmbeddingBagCollection], DynamicEmbeddingBagCollectionSharder)


def test_default_enumerator_is_dynamic() -> None:
    topology = Topology(world_size=2, local_world_size=2, compute_device="cpu")
    planner = DynamicEmbeddingShardingPlanner(topology=topology, constraints=_constraints(), debug=False)
    plan = planner.plan(_ec(), [DynamicEmbeddingCollectionSharder()])
    assert isinstance(plan.plan[""]["d"], DynamicEmbParameterSharding)
    assert math.isclose(planner.dynamic_table_memory["d"].shard_capacity, 512)
